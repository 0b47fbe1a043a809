"""The skills of the embedded synthetic world: procedurally generated prompt/response pairs.

Pure Python (no torch): config validation and docs import this module.

Every example reads ``<skill>:<payload>=<response>``, e.g. ``add:07+45=052``. Formats are the ones measured
as learnable in about a minute on 2 CPU cores (research note synthetic-world.md, and scripts/bench_world.py):
fixed-width zero-padded numbers (free-length addition reached only 2.5 %) and strings of 3-6 letters.
`cnt` counts a fixed letter: counting a letter named in the prompt stalled at 73-86 % in that budget.

Train/validation/test split: a procedural skill's example is held out iff a stable hash of its payload (the
text between ``<skill>:`` and ``=``) falls in the held-out 1/10; the hash's next digit halves the held-out
payloads into ``validation`` and ``test`` (so pretraining, which draws only ``train``, is the same with or without
a validation split). The hash ignores the skill name, so a string held out for ``rev`` is held out for ``copy``,
``sort`` and ``rot1`` too: the model never sees a held-out payload under any skill. ``fact`` is the exception: it
is a memorised table, and its validation and test splits *are* the table (they measure recall of what pretraining
stored, not generalisation).
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from ftlab.config.names import PRETRAIN_SKILLS, TARGET_SKILLS

ALL_SKILLS = PRETRAIN_SKILLS + TARGET_SKILLS
# The default pretraining mix (ftlab.config.schema.WorldConfig.skills mirrors it; a test checks they agree).
DEFAULT_SKILLS = ("add", "rev", "copy", "sort", "succ", "cnt")
SPLITS = ("train", "validation", "test")

SKILL_DOCS = {
    "add": "2-digit addition, zero-padded operands and 3-digit sum: add:07+45=052",
    "rev": "reverse a string of 3-6 lowercase letters: rev:abcd=dcba",
    "copy": "copy a string of 3-6 lowercase letters: copy:abcd=abcd",
    "sort": "sort the letters of a 3-6 letter string: sort:dbca=abcd",
    "succ": "successor of a zero-padded 4-digit number: succ:0459=0460",
    "cnt": "count the letter a in a string of 3-6 lowercase letters: cnt:banana=3",
    "fact": "recall a synthetic fact table (200 names -> 2-digit values): fact:kelo=47; test = the table itself",
    "sub": "2-digit subtraction a-b with a>=b, 3-digit zero-padded result as add's: sub:45-07=038 (fine-tuning target)",
    "rot1": "shift each letter of a 3-6 letter string by one (z->a): rot1:abz=bca (fine-tuning target)",
    "depth": "nesting depth of a balanced string of 3-9 bracket pairs: depth:(()(()))=3 (fine-tuning target, far from "
             "every pretraining skill)",
}

# Which pretraining skills share structure with each target: the near ones of `forgetting_by_distance`
# (ftlab.eval.metrics), every other pretraining skill is far. Structural, by construction of the formats; the gradient
# measurement in ftlab.world.distance (scripts/world_distances.py, docs/world.md) is printed beside it.
NEIGHBOURS: dict[str, tuple[str, ...]] = {
    # sub: add's operand format (two zero-padded 2-digit numbers, 3-digit answer) with the inverse operation;
    # succ is the same digit arithmetic with carries (+1 on 4 digits).
    "sub": ("add", "succ"),
    # rot1: a 3-6 letter string mapped position by position, as copy (identity map), rev (same letters, reversed)
    # and sort (same letters, reordered) do; the same payload strings (the hash split is shared).
    "rot1": ("copy", "rev", "sort"),
    # depth: an alphabet no pretraining skill uses (brackets), an operation none does (a running maximum of a
    # +1/-1 walk); its one-digit answer is the only thing it shares with cnt.
    "depth": (),
}

# Characters any skill can emit (prompts and responses); the tokenizer covers these and more.
SKILL_CHARS = frozenset(string.ascii_lowercase + string.digits + ":=+-()")

_LETTERS = string.ascii_lowercase
_TEST_BUCKETS = 10  # 1 in 10 payloads is held out
_FACT_SIZE = 200
_FACT_SEED = 20240611  # the table is part of the world's definition, independent of any run seed


def _split_of(payload: str) -> str:
    # blake2b, not hash(): Python's str hash is salted per process.
    h = int.from_bytes(hashlib.blake2b(payload.encode(), digest_size=8).digest(), "little")
    if h % _TEST_BUCKETS:
        return "train"
    return "test" if (h // _TEST_BUCKETS) % 2 == 0 else "validation"


def _word(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


def _fact_table() -> dict[str, str]:
    rng = random.Random(_FACT_SEED)
    table: dict[str, str] = {}
    while len(table) < _FACT_SIZE:
        name = "".join(rng.choice(_LETTERS) for _ in range(4))
        if name not in table:
            table[name] = f"{rng.randrange(100):02d}"
    return table


_FACTS = _fact_table()
_FACT_NAMES = sorted(_FACTS)


# --------------------------------------------------------------------------------------- payload samplers
def _sample_add(rng: random.Random) -> str:
    return f"{rng.randrange(100):02d}+{rng.randrange(100):02d}"


def _answer_add(p: str) -> str:
    a, b = p.split("+")
    return f"{int(a) + int(b):03d}"


def _sample_sub(rng: random.Random) -> str:
    a, b = rng.randrange(100), rng.randrange(100)
    a, b = max(a, b), min(a, b)
    return f"{a:02d}-{b:02d}"


def _answer_sub(p: str) -> str:
    # Three digits, as add writes its sum: with a 2-digit answer the first fine-tuning steps mostly relearnt the
    # answer's length, wiping add out before sub was learnt (full FT, lr 3e-4: add 93 -> 22 by step 20, gain 31.5 at
    # step 300); with add's format, gain 65.5 and add keeps 13 — the interference measured is the skills', not the width
    a, b = p.split("-")
    return f"{int(a) - int(b):03d}"


def _sample_succ(rng: random.Random) -> str:
    return f"{rng.randrange(9999):04d}"  # 0000..9998, so the successor keeps 4 digits


def _answer_succ(p: str) -> str:
    return f"{int(p) + 1:04d}"


def _sample_cnt(rng: random.Random) -> str:
    # Each position is an `a` with probability 0.4 (else any letter), so counts 0-6 all occur; uniform
    # letters would make nearly every answer 0. (Counting a letter named in the prompt, `cnt:abab/b=2`,
    # stalled at 73-86 % within the 2-core budget; the fixed letter reaches 99-100 %.)
    return "".join("a" if rng.random() < 0.4 else rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))


def _answer_cnt(p: str) -> str:
    return str(p.count("a"))


def _rot1(s: str) -> str:
    return "".join(_LETTERS[(_LETTERS.index(c) + 1) % 26] for c in s)


def _sample_depth(rng: random.Random) -> str:
    # A uniform +1/-1 choice wherever both keep the string balanced. 3-9 pairs give 6,914 distinct strings (sum
    # of Catalan numbers), ~340 in the test split: 200 distinct test items, as every target has (3-8 pairs left
    # ~100); depths 1-9, one digit, mostly 2-4.
    pairs = rng.randint(3, 9)
    out, opened, depth = [], 0, 0
    while len(out) < 2 * pairs:
        if opened < pairs and (depth == 0 or rng.random() < 0.5):
            out.append("(")
            opened, depth = opened + 1, depth + 1
        else:
            out.append(")")
            depth -= 1
    return "".join(out)


def _answer_depth(p: str) -> str:
    depth = top = 0
    for c in p:
        depth += 1 if c == "(" else -1
        top = max(top, depth)
    return str(top)


def _sample_fact(rng: random.Random) -> str:
    return rng.choice(_FACT_NAMES)


@dataclass(frozen=True)
class Skill:
    name: str
    sample: Callable[[random.Random], str]  # draws a payload
    answer: Callable[[str], str]  # payload -> response
    procedural: bool = True  # False: a memorised table whose test split is the table itself
    pool: Optional[int] = None  # number of distinct payloads, when small enough to matter


SKILLS: dict[str, Skill] = {
    "add": Skill("add", _sample_add, _answer_add, pool=10_000),
    "rev": Skill("rev", _word, lambda p: p[::-1]),
    "copy": Skill("copy", _word, lambda p: p),
    "sort": Skill("sort", _word, lambda p: "".join(sorted(p))),
    "succ": Skill("succ", _sample_succ, _answer_succ, pool=9_999),
    "cnt": Skill("cnt", _sample_cnt, _answer_cnt),
    "fact": Skill("fact", _sample_fact, _FACTS.__getitem__, procedural=False, pool=_FACT_SIZE),
    "sub": Skill("sub", _sample_sub, _answer_sub, pool=5_050),
    "rot1": Skill("rot1", _word, _rot1),
    "depth": Skill("depth", _sample_depth, _answer_depth, pool=6_914),
}
assert set(SKILLS) == set(ALL_SKILLS) == set(SKILL_DOCS)
assert set(NEIGHBOURS) == set(TARGET_SKILLS) and all(set(v) <= set(PRETRAIN_SKILLS) for v in NEIGHBOURS.values())


def _check(skill: str, split: str) -> Skill:
    if skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; valid: {', '.join(ALL_SKILLS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return SKILLS[skill]


def format_prompt(skill: str, payload: str) -> str:
    return f"{skill}:{payload}="


def sample_payload(skill: str, split: str, rng: random.Random) -> str:
    """One payload of `skill` from `split` (rejection sampling on the hash split; ~1.1 draws on average)."""
    sk = _check(skill, split)
    if not sk.procedural:
        return sk.sample(rng)
    while True:
        p = sk.sample(rng)
        if _split_of(p) == split:
            return p


def payload_split(skill: str, payload: str) -> str:
    """Which split a payload belongs to ("train", "validation" or "test"; a memorised skill's entries are in all:
    "both")."""
    if not _check(skill, "train").procedural:
        return "both"
    return _split_of(payload)


def _seed_for(skill: str, split: str, seed: int) -> int:
    # A stable per-(skill, split, seed) stream, independent of which other skills are asked for.
    return int.from_bytes(hashlib.blake2b(f"{skill}|{split}|{seed}".encode(), digest_size=8).digest(), "little")


def make_examples(skill: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` examples of `skill` from `split`, deterministic by `seed`.

    Payloads are distinct while the split has unused ones (add's test split holds ~500, sub's ~250), then
    may repeat. Ids are ``<skill>-<split>-<i>`` (``<skill>-<split>-s<seed>-<i>`` for seed != 0).

    Returns:
        Dicts with keys ``id``, ``prompt`` (e.g. ``"add:07+45="``) and ``response`` (e.g. ``"052"``).
    """
    sk = _check(skill, split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(_seed_for(skill, split, seed))
    tag = f"{skill}-{split}-" if seed == 0 else f"{skill}-{split}-s{seed}-"
    out: list[dict] = []
    seen: set[str] = set()
    misses = 0
    while len(out) < n:
        p = sample_payload(skill, split, rng)
        if misses < 2_000 and p in seen:
            misses += 1  # 2,000 repeats in a row: the split is taken as exhausted, repeats allowed from now on
            if misses < 2_000:
                continue
        elif misses < 2_000:
            misses = 0
        seen.add(p)
        out.append({"id": f"{tag}{len(out)}", "prompt": format_prompt(skill, p), "response": sk.answer(p)})
    return out


def sample_stream(skills: Sequence[str], seed: int = 0, split: str = "train") -> Iterable[tuple[str, str]]:
    """An unlimited stream of (prompt, response) pairs, skill drawn uniformly per example; deterministic."""
    for s in skills:
        _check(s, split)
    rng = random.Random(_seed_for("|".join(skills), split, seed))
    skills = list(skills)
    while True:
        s = rng.choice(skills)
        p = sample_payload(s, split, rng)
        yield format_prompt(s, p), SKILLS[s].answer(p)


def pretrain_text(split: str, n: int, seed: int = 0, skills: Optional[Sequence[str]] = None) -> list[str]:
    """`n` full lines (prompt + response) from the pretraining skills, for a held-out perplexity eval.

    The test split draws only held-out payloads of the procedural skills (``fact``'s table is what
    pretraining memorised, so it is left out of ``test``). Lines cycle over the skills in order.

    Args:
        split: "train", "validation" or "test".
        n: number of lines.
        seed: picks the lines.
        skills: pretraining skills to draw from; default: the default mix (`DEFAULT_SKILLS`).
    """
    skills = tuple(DEFAULT_SKILLS if skills is None else skills)
    bad = [s for s in skills if s not in PRETRAIN_SKILLS]
    if bad:
        raise ValueError(f"not pretraining skills: {bad}; valid: {', '.join(PRETRAIN_SKILLS)}")
    if split != "train":
        skills = tuple(s for s in skills if SKILLS[s].procedural)
    if not skills:
        raise ValueError("pretrain_text: no procedural skill to draw held-out lines from")
    per = -(-n // len(skills))  # ceil
    # A seed offset so these lines differ from the accuracy eval's examples (same split, other draws).
    pools = {s: make_examples(s, split, per, seed=seed + 7919) for s in skills}
    lines = []
    for i in range(n):
        ex = pools[skills[i % len(skills)]][i // len(skills)]
        lines.append(ex["prompt"] + ex["response"])
    return lines
