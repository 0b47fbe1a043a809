"""Training and evaluation data behind `DataConfig`: one row format for every source.

Every row is ``{"id", "prompt", "response", "reference"}``: ``prompt`` is the text fed to the model, ``response``
the training target that follows it, ``reference`` what the target eval compares a generation with (the final
number for ``answer: number`` data such as GSM8K, the response itself for ``answer: exact``).

Where rows come from (first match wins):

- ``data.path`` set (any source): a local ``.jsonl`` file (one JSON object per line; a ``.json`` file holding a
  list also works) with the same fields as the hub data (``data.prompt_field``, ``data.response_field``).
- ``source: synth``: the embedded world's generator, ``ftlab.world.skills.make_examples(skill, split, n, seed)``.
- ``source: hf``: ``datasets.load_dataset(hf_path, hf_name, revision=...)``, splits ``data.split`` / ``data.eval_split``.

Eval rows come from ``data.eval_path`` when set, else the hub's ``eval_split``, else (a local ``data.path``, or a
hub dataset without that split) a **held-out slice** of the training rows, removed from training:

    held-out rule: rows are grouped by their exact prompt-field text; groups are ranked by the sha256 of that
    text; the lowest-ranked groups are held out until they hold at least ceil(10%) of the rows (at least 1,
    at most 1000). The rule depends on the file's content only, not on the seed or on the row order, so every
    seed trains on the same rows and is scored on the same held-out rows, and a prompt never sits on both sides.

Eval rows keep their file/split order; ``limit`` takes the first ``limit`` of them (the seed does not change
which rows a file or hub eval uses; synth evals are generated from the seed). ``n_train`` picks that many rows
without replacement with ``random.Random(seed)``, kept in file order (the trainer shuffles).

Formatting is a hook per data name (`FORMATS.register`); ``gsm8k`` writes ``"Question: {question}\\nAnswer:"`` and
``" {answer}"`` (rationale and ``#### N`` line kept), reference = the number after ``####``. The generic default
uses the prompt field as the prompt and the response field as the response.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ftlab.config.registry import Registry
from ftlab.config.schema import DataConfig
from ftlab.data.answers import extract_number

__all__ = [
    "load_train",
    "load_eval",
    "FORMATS",
    "heldout_split",
    "MissingFieldError",
    "read_jsonl",
    "HELDOUT_FRACTION",
    "HELDOUT_MAX",
    "SYNTH_N_TRAIN",
    "SYNTH_N_EVAL",
    "general_rows",
    "mix_count",
]

SYNTH_N_TRAIN = 4000
SYNTH_N_EVAL = 200
HELDOUT_FRACTION = 0.1
HELDOUT_MAX = 1000


class MissingFieldError(KeyError, ValueError):
    """A prompt/response field is not in the data; the message names the file or dataset, the field and the
    fields that exist."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class RawRow:
    """One record as read from its source, before formatting."""

    id: str
    where: str  # for error messages: "FILE:LINE" or "openai/gsm8k[train] row 12"
    record: dict


# ------------------------------------------------------------------------------------------------ formatting
# A format hook turns a raw record into {"prompt", "response", "reference"}; `field(name, key)` reads a field
# with a clear error when it is missing.
Formatter = Callable[[dict, DataConfig, Callable[[str, str], str]], dict]
# data.name -> its Formatter; a data config without one reads prompt_field / response_field as they are.
FORMATS: Registry = Registry("data format", "data.name")


def _default_format(rec: dict, cfg: DataConfig, field: Callable[[str, str], str]) -> dict:
    prompt = field(cfg.prompt_field, "prompt_field")
    response = field(cfg.response_field, "response_field")
    reference = extract_number(response) if cfg.answer == "number" else response
    return {"prompt": prompt, "response": response, "reference": reference}


def _gsm8k_format(rec: dict, cfg: DataConfig, field: Callable[[str, str], str]) -> dict:
    question = field(cfg.prompt_field, "prompt_field").strip()
    answer = field(cfg.response_field, "response_field").strip()
    return {"prompt": f"Question: {question}\nAnswer:", "response": f" {answer}", "reference": extract_number(answer)}


FORMATS.register("gsm8k", _gsm8k_format)
_FORMAT_BY_HF_PATH = {"openai/gsm8k": "gsm8k", "gsm8k": "gsm8k"}


def _formatter(cfg: DataConfig) -> Formatter:
    if cfg.name in FORMATS:
        return FORMATS.get(cfg.name)
    alias = _FORMAT_BY_HF_PATH.get((cfg.hf_path or "").lower())
    return FORMATS.get(alias) if alias else _default_format


def format_row(cfg: DataConfig, raw: RawRow, *, for_eval: bool) -> dict:
    rec = raw.record

    def field(name: str, key: str) -> str:
        if name not in rec or rec[name] is None:
            what = "is missing" if name not in rec else "is null"
            raise MissingFieldError(
                f"data.{key}: field {name!r} {what} in {raw.where}; fields there: "
                f"{', '.join(map(repr, rec)) or '(none)'}. Set data.{key}=<one of them>"
            )
        v = rec[name]
        return v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)

    out = _formatter(cfg)(rec, cfg, field)
    if for_eval and out.get("reference") is None:
        raise ValueError(
            f"data.answer: {raw.where} has no reference to score against (data.answer={cfg.answer!r} found no "
            f"number in field {cfg.response_field!r}); fix the row or use data.answer=exact"
        )
    return {"id": raw.id, "prompt": out["prompt"], "response": out["response"], "reference": out["reference"]}


# ---------------------------------------------------------------------------------------------- local files
def read_jsonl(path: str | Path, key: str = "data.path") -> list[RawRow]:
    """Rows of a .jsonl file (blank lines skipped) or of a .json file holding a list of objects."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{key}: file {str(p)!r} does not exist")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 BOM is accepted
    except UnicodeDecodeError as e:
        at = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{key}: {p}:{at} is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    rows: list[RawRow] = []
    if p.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{key}: {p} is not valid JSON ({e.msg} at line {e.lineno})") from None
        pairs = [(i + 1, item, f"{p} item {i + 1}") for i, item in enumerate(items)]
    else:
        pairs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                pairs.append((lineno, json.loads(line), f"{p}:{lineno}"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{key}: {p}:{lineno} is not valid JSON ({e.msg}); one object per line") from None
    for n, item, where in pairs:
        if not isinstance(item, dict):
            raise ValueError(f"{key}: {where} is a {type(item).__name__}, not a JSON object with fields")
        rows.append(RawRow(id=f"{p.stem}:{n}", where=where, record=item))
    if not rows:
        raise ValueError(f"{key}: {p} holds no rows")
    return rows


# -------------------------------------------------------------------------------------------------- held out
def heldout_split(prompts: Sequence[str]) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), each in input order; the rule is in the module doc."""
    n = len(prompts)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    if len(groups) < 2:
        raise ValueError(
            f"cannot hold out eval rows: the {n} row(s) have fewer than 2 distinct prompts; "
            "give the eval rows in their own file with data.eval_path=FILE.jsonl"
        )
    want = min(HELDOUT_MAX, max(1, math.ceil(HELDOUT_FRACTION * n)))
    ranked = sorted(groups, key=lambda p: hashlib.sha256(p.encode("utf-8")).hexdigest())
    held: set[int] = set()
    for p in ranked:
        if len(held) >= want:
            break
        if len(held) + len(groups[p]) < n:  # never hold out every row
            held.update(groups[p])
    return [i for i in range(n) if i not in held], sorted(held)


def _prompt_key(raw: RawRow, cfg: DataConfig) -> str:
    v = raw.record.get(cfg.prompt_field)
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


# ------------------------------------------------------------------------------------------------------ hub
def _hub_dataset(cfg: DataConfig):
    """The hub dataset as a DatasetDict (all splits; datasets prepares them all anyway). Never hangs."""
    from ftlab.models.hub import load_hub_dataset

    return load_hub_dataset(
        cfg.hf_path, cfg.hf_name, revision=cfg.revision, what=f"data: cannot load dataset {cfg.name!r}",
        fix=f"Point ftlab at local files instead: data.path=FILE.jsonl (one JSON object per line with fields "
            f"{cfg.prompt_field!r} and {cfg.response_field!r}), and optionally data.eval_path=TEST.jsonl for the eval rows")


def _hub_split(cfg: DataConfig, dd, split: str, key: str):
    if split not in dd:
        raise ValueError(
            f"data.{key}: dataset {cfg.hf_path!r} has no split {split!r}; splits: {', '.join(dd)}"
        )
    ds = dd[split]
    for fkey in ("prompt_field", "response_field"):
        name = getattr(cfg, fkey)
        if name not in ds.column_names:
            raise MissingFieldError(
                f"data.{fkey}: field {name!r} is missing in dataset {cfg.hf_path!r} (split {split!r}); fields "
                f"there: {', '.join(map(repr, ds.column_names))}. Set data.{fkey}=<one of them>"
            )
    return ds


def _hub_rows(cfg: DataConfig, ds, split: str, indices: Optional[Sequence[int]] = None) -> list[RawRow]:
    if indices is None:
        indices = range(len(ds))
    indices = list(indices)
    records = ds.to_list() if indices == list(range(len(ds))) else ds.select(indices).to_list()
    name = cfg.hf_path + (f"/{cfg.hf_name}" if cfg.hf_name else "")
    return [RawRow(id=f"{name}:{split}:{i}", where=f"{cfg.hf_path}[{split}] row {i}", record=r)
            for i, r in zip(indices, records)]


def _hub_train_eval_indices(cfg: DataConfig, dd) -> tuple[Any, list[int], Any, Optional[list[int]]]:
    """(train ds, train indices, eval ds, eval indices or None for all rows of eval ds)."""
    train = _hub_split(cfg, dd, cfg.split, "split")
    if cfg.eval_split in dd and cfg.eval_split != cfg.split:
        return train, list(range(len(train))), _hub_split(cfg, dd, cfg.eval_split, "eval_split"), None
    prompts = [p if isinstance(p, str) else json.dumps(p, sort_keys=True) for p in train[cfg.prompt_field]]
    tr, ev = heldout_split(prompts)
    return train, tr, train, ev


# ---------------------------------------------------------------------------------------------------- synth
def _synth(cfg: DataConfig, split: str, n: int, seed: int) -> list[dict]:
    if not cfg.skill:
        raise ValueError("data.skill: synth data needs a skill")
    from ftlab.world.skills import (
        make_examples,  # lazy: only the embedded world needs it
    )

    rows = []
    for ex in make_examples(cfg.skill, split, n, seed):
        ref = extract_number(ex["response"]) if cfg.answer == "number" else ex["response"]
        rows.append({"id": str(ex["id"]), "prompt": ex["prompt"], "response": ex["response"], "reference": ref})
    return rows


# ------------------------------------------------------------------------------------------------ public API
def _subset(rows: list, n: Optional[int], seed: int) -> list:
    if n is None or n >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def load_train(cfg: DataConfig, seed: int) -> list[dict]:
    """The training rows of `cfg` ({"id", "prompt", "response", "reference"}), `n_train` of them if set, followed
    by the general rows of `data.mix` (`general_rows`; the trainer shuffles)."""
    rows = _load_task_train(cfg, seed)
    if cfg.mix > 0:
        rows = rows + general_rows(cfg, mix_count(len(rows), cfg.mix), seed)
    return rows


def mix_count(n_task: int, mix: float) -> int:
    """General rows to add to `n_task` task rows so that they are a share `mix` of the stream."""
    return round(n_task * mix / (1 - mix))


def general_rows(cfg: DataConfig, n: int, seed: int) -> list[dict]:
    """`n` rows of general data for mixing, seeded, ids prefixed ``mix:``.

    ``data.mix_source`` unset (synth data): replay of the pretraining skills ``data.mix_skills``, split evenly
    over them in turn (the world's own generator, train split). Set: general text, a local .jsonl/.json file
    or a hub dataset (``mix_name``, ``mix_split``), field ``data.mix_field``; a row is the whole text as the
    response to an empty prompt (a language-modelling row). Texts are drawn without replacement while they last,
    then the pool is reshuffled and drawn again."""
    if n <= 0:
        return []
    if cfg.mix_source is None:
        from ftlab.world.skills import make_examples

        skills = list(cfg.mix_skills or [])
        if not skills:
            raise ValueError("data.mix_skills: replay needs at least one pretraining skill")
        out = []
        for k, skill in enumerate(skills):
            count = n // len(skills) + (k < n % len(skills))
            out += [{"id": f"mix:{ex['id']}", "prompt": ex["prompt"], "response": ex["response"],
                     "reference": ex["response"]} for ex in make_examples(skill, "train", count, seed)]
        return out
    texts = _general_texts(cfg)
    picks = draw_passes(len(texts), n, random.Random(f"mix:{seed}"))
    return [{"id": f"mix:{texts[i][0]}", "prompt": "", "response": texts[i][1], "reference": texts[i][1]}
            for i in picks]


def draw_passes(size: int, n: int, rng: random.Random) -> list[int]:
    """`n` indices into `size` rows: shuffled passes over all of them, so no row repeats before every row was drawn
    (a pass cut short at n)."""
    picks: list[int] = []
    while len(picks) < n:
        order = list(range(size))
        rng.shuffle(order)
        picks += order[: n - len(picks)]
    return picks


def _general_texts(cfg: DataConfig) -> list[tuple[str, str]]:
    """(id, text) of every non-empty text of the mix source."""
    src = Path(cfg.mix_source).expanduser()
    if src.is_file():
        raws = read_jsonl(src, "data.mix_source")
    else:
        hub = DataConfig(name=f"mix:{cfg.mix_source}", source="hf", hf_path=cfg.mix_source, hf_name=cfg.mix_name,
                         prompt_field=cfg.mix_field, response_field=cfg.mix_field)
        from ftlab.models.hub import HubUnavailable

        try:
            dd = _hub_dataset(hub)
        except HubUnavailable as e:
            raise HubUnavailable(f"data.mix_source: {e}. For mixing, a local file is data.mix_source=FILE.jsonl "
                                 f"with the text in field data.mix_field={cfg.mix_field!r}") from e
        if cfg.mix_split not in dd:
            raise ValueError(f"data.mix_split: dataset {cfg.mix_source!r} has no split {cfg.mix_split!r}; "
                             f"splits: {', '.join(dd)}")
        raws = _hub_rows(hub, dd[cfg.mix_split], cfg.mix_split)
    out = []
    for r in raws:
        if cfg.mix_field not in r.record:
            raise MissingFieldError(f"data.mix_field: field {cfg.mix_field!r} is missing in {r.where}; fields "
                                    f"there: {', '.join(map(repr, r.record)) or '(none)'}. Set data.mix_field=<one of them>")
        text = r.record[cfg.mix_field]
        if isinstance(text, str) and text.strip():
            out.append((r.id, text))
    if not out:
        raise ValueError(f"data.mix_source: {cfg.mix_source!r} holds no non-empty text in field {cfg.mix_field!r}")
    return out


def _load_task_train(cfg: DataConfig, seed: int) -> list[dict]:
    if cfg.path:
        raws = read_jsonl(cfg.path, "data.path")
        if not cfg.eval_path:
            tr, _ = heldout_split([_prompt_key(r, cfg) for r in raws])
            raws = [raws[i] for i in tr]
        raws = _subset(raws, cfg.n_train, seed)
    elif cfg.source == "synth":
        return _synth(cfg, "train", cfg.n_train or SYNTH_N_TRAIN, seed)
    elif cfg.source == "hf":
        if not cfg.hf_path:
            raise ValueError("data.hf_path: data.source=hf needs data.hf_path (a hub dataset id) or data.path=FILE.jsonl")
        dd = _hub_dataset(cfg)
        if cfg.eval_path:
            ds, idx = _hub_split(cfg, dd, cfg.split, "split"), None
        else:
            ds, idx, _, _ = _hub_train_eval_indices(cfg, dd)
        idx = list(range(len(ds))) if idx is None else idx
        raws = _hub_rows(cfg, ds, cfg.split, _subset(idx, cfg.n_train, seed))
    elif cfg.source == "jsonl":
        raise ValueError("data.path: data.source=jsonl needs data.path=FILE.jsonl")
    else:
        raise ValueError(f"data.source: unknown value {cfg.source!r}; valid choices: synth, hf, jsonl")
    return [format_row(cfg, r, for_eval=False) for r in raws]


def load_eval(cfg: DataConfig, limit: Optional[int], seed: int, split: str = "test") -> list[dict]:
    """The target-eval rows of `cfg`, the first `limit` of them (synth: `limit` or 200 generated rows).

    split="validation": the rows hyperparameters are selected on, disjoint from train and test (synth: the world's
    validation payloads; otherwise data.validation_path)."""
    if split == "validation":
        if cfg.source == "synth":
            return _synth(cfg, "validation", limit or SYNTH_N_EVAL, seed)
        if not cfg.validation_path:
            raise ValueError(f"data.validation_path: data {cfg.name!r} has no validation split; give a .jsonl of rows "
                             "disjoint from the training and test rows, or set eval.validation=false")
        raws = read_jsonl(cfg.validation_path, "data.validation_path")
        raws = raws[:limit] if limit else raws
        return [format_row(cfg, r, for_eval=True) for r in raws]
    if split != "test":
        raise ValueError(f"load_eval: split must be 'test' or 'validation', got {split!r}")
    if cfg.eval_path:
        raws = read_jsonl(cfg.eval_path, "data.eval_path")
    elif cfg.path:
        raws = read_jsonl(cfg.path, "data.path")
        _, ev = heldout_split([_prompt_key(r, cfg) for r in raws])
        raws = [raws[i] for i in ev]
    elif cfg.source == "synth":
        return _synth(cfg, "test", limit or SYNTH_N_EVAL, seed)
    elif cfg.source == "hf":
        if not cfg.hf_path:
            raise ValueError("data.hf_path: data.source=hf needs data.hf_path (a hub dataset id) or data.path=FILE.jsonl")
        dd = _hub_dataset(cfg)
        _, _, ds, idx = _hub_train_eval_indices(cfg, dd)
        split = cfg.eval_split if idx is None else cfg.split
        idx = list(range(len(ds))) if idx is None else idx
        raws = _hub_rows(cfg, ds, split, idx[:limit] if limit else idx)
    elif cfg.source == "jsonl":
        raise ValueError("data.path: data.source=jsonl needs data.path=FILE.jsonl")
    else:
        raise ValueError(f"data.source: unknown value {cfg.source!r}; valid choices: synth, hf, jsonl")
    if limit:
        raws = raws[:limit]
    return [format_row(cfg, r, for_eval=True) for r in raws]
