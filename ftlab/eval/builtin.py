# Over 400 lines on purpose: the nine built-in tasks' specs, their row formatters, the per-item checks that refuse
# malformed rows (file:line:field) and the loader that applies them read together; splitting them would scatter one
# task over three modules. How few-shot examples are drawn and rendered is its own module (ftlab.eval.fewshot).
"""Built-in benchmark tasks: where their rows come from and how each row becomes a prompt. Pure Python.

Every task is one of four kinds (see `ftlab.eval.task.KINDS`):

- ``multiple_choice``: rows ``{"id", "context", "choices", "label"}`` (one context, several continuations), or
  ``{"id", "contexts", "continuation", "label"}`` (several contexts, one continuation: WinoGrande's partial
  scoring). Scored by the log-likelihood of each continuation after its context (the continuation follows the
  context after ``Task.delimiter``, a space); ``acc`` = argmax log-likelihood, ``acc_norm`` = argmax
  log-likelihood divided by the continuation's length in characters (lm-evaluation-harness's definitions).
- ``generation``: rows ``{"id", "prompt", "reference"}`` (GSM8K also ``target``: the answer field as is, what
  lm-eval compares with); greedy decoding, answer extraction, exact match (GSM8K: strict_match, flexible_extract
  and robust_match, `ftlab.eval.generation`).
- ``perplexity``: rows ``{"id", "text"}``; corpus perplexity over every token after the first.
- ``loglikelihood_rolling``: rows ``{"id", "text", "n_words", "n_bytes"}``; lm-evaluation-harness's rolling
  log-likelihood of the whole text (`ftlab.eval.perplexity`), per word and per byte of the original text.

Built-in tasks (name: hub dataset [config], eval split, prompt, primary metric, default few-shot):

================  ========================================  ==========  ==================================  ==========
task              hub dataset                               split       prompt -> continuation              metric
================  ========================================  ==========  ==================================  ==========
arc_challenge     allenai/ai2_arc [ARC-Challenge]           test        "Question: Q\\nAnswer:" -> " TEXT"   acc_norm
arc_easy          allenai/ai2_arc [ARC-Easy]                test        same                                acc_norm
hellaswag         Rowan/hellaswag                           validation  "LABEL: CTX" -> " ENDING"           acc_norm
winogrande        allenai/winogrande [winogrande_xl]        validation  "SENT[:_] OPTION" -> " REST"        acc
boolq             aps/super_glue [boolq]                    validation  "P\\nQuestion: Q?\\nAnswer:" -> yes|no acc
mmlu              cais/mmlu [all]                           test        "Q\\nA. ..\\nD. ..\\nAnswer:" -> " A".." D" acc
wikitext          EleutherAI/wikitext_document_level        test        the page, detokenized (lm-eval's)   word_perplexity
                  [wikitext-2-raw-v1]
wikitext_lines    Salesforce/wikitext [wikitext-2-raw-v1]   test        the text (non-empty lines)           perplexity
gsm8k             openai/gsm8k [main]                       test        "Question: Q\\nAnswer:" (data.py)    strict_match
================  ========================================  ==========  ==================================  ==========

The prompts follow lm-evaluation-harness's default task definitions (ARC, HellaSwag's preprocessing, WinoGrande's
partial scoring, BoolQ on super_glue's passages with their title, MMLU with its per-subject description, GSM8K's
``Question:/Answer:``); tests/test_eval_parity.py checks equal prompts, log-likelihoods and accuracies against
lm-eval's own YAMLs at 0-shot and k-shot. Few-shot examples (``few_shot=k``) are picked as lm-eval 0.4.13 picks
them (`ftlab.eval.fewshot.fewshot_draws`): per item, from one random.Random(1234) per task drawn in the split's order (MMLU: the
first k dev rows of the item's subject, lm-eval's first_n), from the task's few-shot split (ARC/HellaSwag/
WinoGrande/BoolQ/GSM8K: train; MMLU: dev) or ``fewshot_path``, never from a local eval file (``path`` with k > 0
and no ``fewshot_path`` is refused); they precede the item, separated by a blank line. MMLU's subjects are
picked with ``subset`` (its ``subject`` field); a limit n takes the first n of each subject (lm-eval's --limit
per subtask).

**Local files.** ``path=FILE.jsonl`` (``eval.paths.<task>=FILE.jsonl``) replaces the hub: one JSON object per
line with the hub dataset's fields (e.g. ARC's ``question``, ``choices: {text, label}``, ``answerKey``). Item
ids are ``<task>/<index>``, the 0-based position in the split or file, so that a local export of a split in
its order gives the same ids as the hub, and predictions from another system can be matched to them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ftlab.config.names import BUILTIN_TASK_KINDS, BUILTIN_TASK_METRICS, GSM8K_STOP, KIND_METRICS
from ftlab.config.registry import Registry
from ftlab.eval import wikitext
from ftlab.eval.fewshot import FEWSHOT_SEED, FEWSHOT_SEP, fewshot_draws, render_fewshot, with_prefix
from ftlab.eval.scoring import row_problem
from ftlab.utils.files import sha256_file

__all__ = ["BUILTINS", "Builtin", "TaskSource", "fewshot_draws", "fewshot_file_problem", "load_builtin",
           "render_fewshot"]



@dataclass(frozen=True)
class Builtin:
    """A built-in task: its hub location and how one raw record becomes a row (its kind: `BUILTIN_TASK_KINDS`)."""

    name: str
    hf_path: str
    hf_name: Optional[str]
    split: str
    fewshot_split: Optional[str]
    to_row: Callable[[dict], Optional[dict]]  # raw record -> row without id (None: skip the record)
    metric: str
    few_shot: int = 0
    answer: str = "exact"  # generation: how a prediction is read
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()  # generation: where a continuation ends
    description: Callable[[dict], str] = lambda rec: ""  # text before the few-shot block (MMLU's subject line)
    group: Optional[Callable[[dict], str]] = None  # MMLU: subject (few-shot examples and subsets by group)
    sampler: str = "default"  # lm-eval's fewshot_config.sampler: "default" (seeded per-item draws) | "first_n"
    # lm-eval hands its sampler the item itself when the task's fewshot_split equals its test_split, which holds as
    # None == None for tasks scored on validation without a fewshot_split (HellaSwag, WinoGrande, BoolQ): then k+1
    # are drawn per item and the first k that are not the item kept, another random sequence than k draws
    fewshot_drop_item: bool = False
    doc: str = ""

    @property
    def kind(self) -> str:  # multiple_choice | generation | perplexity | loglikelihood_rolling
        return BUILTIN_TASK_KINDS[self.name]


@dataclass
class TaskSource:
    """Where a task's rows came from (recorded with the score)."""

    source: str  # "hub:<path>[/<config>]@<revision>:<split>" or "file:<path>"
    sha256: str  # of the local file, or of the loaded records
    fewshot_source: Optional[str] = None


# -------------------------------------------------------------------------------------------- formatting
# Each formatter reads a raw record of its dataset, checking every field it uses: a record that cannot become a
# scorable item raises RowError naming the field (the loader adds the file and line, or the hub row).
class RowError(ValueError):
    """A record that cannot become an item; the message names the field."""


def _fields(rec: dict) -> str:
    return ", ".join(map(repr, rec)) or "(none)"


def _text(rec: dict, field: str) -> str:
    if field not in rec:
        raise RowError(f"field {field!r} is missing; fields there: {_fields(rec)}")
    v = rec[field]
    if not isinstance(v, str):
        raise RowError(f"field {field!r} must be a text, got {v!r}"[:200])
    return v


def _texts(rec: dict, field: str, lo: int = 2, hi: int = 100) -> list[str]:
    if field not in rec:
        raise RowError(f"field {field!r} is missing; fields there: {_fields(rec)}")
    v = rec[field]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise RowError(f"field {field!r} must be a list of texts, got {v!r}"[:200])
    if not lo <= len(v) <= hi:
        raise RowError(f"field {field!r} has {len(v)} choices; an item needs {lo} to {hi}")
    return list(v)


def _index(rec: dict, field: str, n: int, offset: int = 0, unlabelled: str = "") -> int:
    """The label `field`: an integer, or its digits as text (the hub stores HellaSwag's and WinoGrande's as
    strings), counted from `offset`; in range for n choices."""
    if rec.get(field) in (None, ""):
        raise RowError(f"field {field!r} is {'missing' if field not in rec else 'empty'}: the item cannot be "
                       f"scored{unlabelled}")
    v = rec[field]
    digits = isinstance(v, str) and v.strip().lstrip("-").isdigit()
    if isinstance(v, bool) or not (isinstance(v, int) or digits):
        raise RowError(f"field {field!r} must be the index of the correct choice (an integer), got {v!r}")
    i = int(v) - offset
    if not 0 <= i < n:
        raise RowError(f"field {field!r} is {v!r}: out of range for {n} choices ({offset}..{n - 1 + offset})")
    return i


_ARC_NUMERIC = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}


def _arc(rec: dict) -> Optional[dict]:
    question = _text(rec, "question")
    choices = rec.get("choices")
    if not (isinstance(choices, dict) and isinstance(choices.get("text"), list)
            and isinstance(choices.get("label"), list)):
        raise RowError(f"field 'choices' must be {{'text': [...], 'label': [...]}}, got {choices!r}"[:200]
                       if "choices" in rec else f"field 'choices' is missing; fields there: {_fields(rec)}")
    texts, labels = choices["text"], [str(x) for x in choices["label"]]
    if len(texts) < 2 or not all(isinstance(t, str) for t in texts):
        raise RowError(f"field 'choices' must hold at least 2 texts, got {texts!r}"[:200])
    if len(labels) != len(texts):
        raise RowError(f"field 'choices' has {len(texts)} texts but {len(labels)} labels")
    if rec.get("answerKey") in (None, ""):
        raise RowError("field 'answerKey' is missing: the item cannot be scored")
    key = str(rec["answerKey"])
    if key not in labels:  # a few ARC rows use "1".."4" for some and "A".."D" for others
        key = _ARC_NUMERIC.get(key, key)
        labels = [_ARC_NUMERIC.get(x, x) for x in labels]
    if key not in labels:
        raise RowError(f"field 'answerKey' {rec['answerKey']!r} is not one of the choices' labels "
                       f"{[str(x) for x in choices['label']]}")
    return {"context": f"Question: {question}\nAnswer:", "choices": texts, "label": labels.index(key)}


def _hellaswag_pre(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(rec: dict) -> Optional[dict]:
    endings = _texts(rec, "endings")
    label = _index(rec, "label", len(endings), unlabelled=" (HellaSwag's test split has no labels: evaluate the "
                                                          "validation split)")
    ctx = _text(rec, "ctx_a") + " " + _text(rec, "ctx_b").capitalize()
    return {"context": _hellaswag_pre(_text(rec, "activity_label") + ": " + ctx),
            "choices": [_hellaswag_pre(e) for e in endings], "label": label}


def _winogrande(rec: dict) -> Optional[dict]:
    s = _text(rec, "sentence")
    if "_" not in s:
        raise RowError("field 'sentence' has no '_' (the blank an option fills)")
    i = s.index("_")
    options = [_text(rec, "option1"), _text(rec, "option2")]
    label = _index(rec, "answer", 2, offset=1, unlabelled=" (WinoGrande's test split has no answers: evaluate the "
                                                           "validation split)")
    return {"contexts": [s[:i] + o for o in options], "continuation": s[i + 1:].strip(), "label": label}


_YES, _NO = ("true", "yes", "1"), ("false", "no", "0")


def _boolq(rec: dict) -> Optional[dict]:
    field = "answer" if "answer" in rec or "label" not in rec else "label"  # google/boolq: bool; super_glue: 0/1
    if rec.get(field) is None:
        raise RowError(f"field {field!r} is missing: the item cannot be scored (true/false; or 'label' 0/1)")
    answer = rec[field]
    if isinstance(answer, str) and answer.strip().lower() in _YES + _NO:
        answer = answer.strip().lower() in _YES
    elif not isinstance(answer, bool) and not (isinstance(answer, int) and answer in (0, 1)):
        raise RowError(f"field {field!r} must be true or false (or yes/no, 1/0), got {answer!r}")
    passage, question = _text(rec, "passage"), _text(rec, "question")
    return {"context": f"{passage}\nQuestion: {question}?\nAnswer:", "choices": ["no", "yes"],
            "label": int(bool(answer))}


def _mmlu(rec: dict) -> Optional[dict]:
    choices = _texts(rec, "choices", hi=10)
    question = _text(rec, "question")
    letters = "ABCDEFGHIJ"[: len(choices)]
    body = "\n".join(f"{x}. {c}" for x, c in zip(letters, choices))
    return {"context": f"{question.strip()}\n{body}\nAnswer:", "choices": list(letters),
            "label": _index(rec, "answer", len(choices))}


def _mmlu_description(rec: dict) -> str:
    subject = str(rec.get("subject", "")).replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""


def _wikitext(rec: dict) -> Optional[dict]:
    # lm-eval's wikitext task: every page is an item (none skipped), the model reads it detokenized, and word and
    # byte counts are of the page as stored (its process_results)
    if "page" not in rec and "text" in rec:
        raise RowError("field 'page' is missing and 'text' is there: this looks like a line of Salesforce/wikitext; "
                       "task wikitext reads pages (EleutherAI/wikitext_document_level, field 'page'); for lines use "
                       "task wikitext_lines")
    page = _text(rec, "page")
    return {"text": wikitext.detokenize(page), "n_words": wikitext.count_words(page),
            "n_bytes": wikitext.count_bytes(page)}


def _wikitext_lines(rec: dict) -> Optional[dict]:
    text = _text(rec, "text").strip()
    return {"text": text} if text else None


def _gsm8k(rec: dict) -> Optional[dict]:
    from ftlab.config.schema import DataConfig
    from ftlab.data.sources import FORMATS

    def field_(name: str, key: str) -> str:
        return _text(rec, name)

    out = FORMATS.get("gsm8k")(rec, DataConfig(name="gsm8k", answer="number"), field_)
    if out["reference"] is None:
        raise RowError("field 'answer' has no final number ('#### N') to score against")
    # target: lm-eval's doc_to_target ("{{answer}}", unstripped), which its strict/flexible scores compare with
    return {"prompt": out["prompt"], "reference": out["reference"], "response": out["response"],
            "target": _text(rec, "answer")}


BUILTINS: Registry[Builtin] = Registry("built-in task", "eval.target")
for _b in [
    Builtin("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", "train", _arc,
            "acc_norm", doc="ARC-Challenge (AI2 Reasoning Challenge, hard set)"),
    Builtin("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", "train", _arc, "acc_norm",
            doc="ARC-Easy"),
    Builtin("hellaswag", "Rowan/hellaswag", None, "validation", "train", _hellaswag,
            "acc_norm", fewshot_drop_item=True, doc="HellaSwag sentence completion"),
    Builtin("winogrande", "allenai/winogrande", "winogrande_xl", "validation", "train", _winogrande, "acc",
            fewshot_drop_item=True, doc="WinoGrande (partial scoring: the option goes in the context)"),
    Builtin("boolq", "aps/super_glue", "boolq", "validation", "train", _boolq, "acc", fewshot_drop_item=True,
            doc="BoolQ yes/no questions on a passage (super_glue's, as lm-eval; hf_path=google/boolq: the original)"),
    Builtin("mmlu", "cais/mmlu", "all", "test", "dev", _mmlu, "acc",
            description=_mmlu_description, group=lambda rec: str(rec.get("subject", "")), sampler="first_n",
            doc="MMLU, 57 subjects (subset=[...] picks some)"),
    Builtin("wikitext", "EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test", None, _wikitext,
            "word_perplexity", doc="WikiText-2 (raw) as lm-eval measures it: pages, rolling windows, word perplexity"),
    Builtin("wikitext_lines", "Salesforce/wikitext", "wikitext-2-raw-v1", "test", None, _wikitext_lines,
            "perplexity", doc="WikiText-2 (raw) token perplexity, one row per non-empty line (not lm-eval's number)"),
    Builtin("gsm8k", "openai/gsm8k", "main", "test", "train", _gsm8k, "strict_match", few_shot=5,
            answer="number", max_new_tokens=256, stop=GSM8K_STOP,
            doc="GSM8K grade-school math: lm-eval's strict-match (primary) and flexible-extract, ftlab's robust_match"),
]:
    if _b.name not in BUILTIN_TASK_KINDS or _b.metric not in BUILTIN_TASK_METRICS.get(_b.name, KIND_METRICS[_b.kind]):
        raise RuntimeError(f"built-in task {_b.name!r}: not in ftlab.config.names.BUILTIN_TASK_KINDS, or its metric "
                           f"{_b.metric!r} is not one of its kind's")
    BUILTINS.register(_b.name, _b)
if set(BUILTINS.names()) != set(BUILTIN_TASK_KINDS):
    raise RuntimeError("ftlab.config.names.BUILTIN_TASK_KINDS names a task without a spec in ftlab.eval.builtin")


# ---------------------------------------------------------------------------------------------- loading


def _read_local(path: str, key: str) -> tuple[list[dict], list[str]]:
    """(records, where each is: "FILE:LINE") of a local .jsonl (or .json list)."""
    from ftlab.data.sources import read_jsonl

    raws = read_jsonl(path, key)
    return [r.record for r in raws], [r.where for r in raws]


def _hub_where(spec: Builtin, split: str, hf_path: Optional[str], n: int) -> list[str]:
    return [f"{hf_path or spec.hf_path}[{split}] row {i}" for i in range(n)]


def checked_row(spec: Builtin, rec: dict, where: str, key: str) -> Optional[dict]:
    """spec.to_row(rec), checked: a record that cannot become a scorable item is refused with the key, file and
    line (or hub row), and the field."""
    try:
        row = spec.to_row(rec)
        problem = row_problem(spec.kind, row) if row is not None else None
    except RowError as e:
        problem = str(e)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        problem = f"cannot be read as a {spec.name} item ({type(e).__name__}: {e}); fields there: {_fields(rec)}"
    if problem:
        raise ValueError(f"{key}: {where}: {problem}")
    return row


def _hub_location(spec: Builtin, hf_path: Optional[str], hf_name: Optional[str]) -> tuple[str, Optional[str]]:
    """(dataset, config): the spec's config belongs to the spec's dataset, so another hf_path without hf_name
    loads that dataset's default config (hf_path=google/boolq has none named "boolq")."""
    path = hf_path or spec.hf_path
    if hf_name is not None:
        return path, hf_name
    return path, spec.hf_name if path == spec.hf_path else None


def _read_hub(spec: Builtin, split: str, hf_path: Optional[str], hf_name: Optional[str],
              revision: Optional[str], what: str) -> list[dict]:
    """One split of a hub dataset, as a list of records. Fails fast (HubUnavailable) offline."""
    from ftlab.models.hub import load_hub_dataset

    path, name = _hub_location(spec, hf_path, hf_name)
    fix = (f"Point ftlab at a local file instead: eval.paths.{spec.name}=FILE.jsonl (one JSON object per line, with "
           "the hub dataset's fields)")
    ds = load_hub_dataset(path, name, revision=revision, split=split, what=f"eval: cannot load task {spec.name!r}",
                          detail=f"{what}: ", fix=fix)
    return ds.to_list()


def _records_sha(records: list[dict]) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()


def fewshot_file_problem(name: str, k: int, path: Optional[str], fewshot_path: Optional[str]) -> Optional[str]:
    """Why task `name` at k-shot cannot run from a local eval file `path` (its fix named), or None: few-shot
    examples never come from the rows being evaluated, so a local eval file needs a few-shot file of its own."""
    if not (path and k > 0 and not fewshot_path):
        return None
    split = BUILTINS.get(name, "eval: built-in task").fewshot_split or "train"
    return (f"eval.paths.{name}: with a local eval file, {k}-shot needs its own examples: set "
            f"eval.tasks.{name}.fewshot_path=FILE.jsonl (e.g. the hub's {split} split) or eval.tasks.{name}.few_shot=0")


def load_builtin(name: str, *, n: Optional[int] = None, few_shot: Optional[int] = None,
                 path: Optional[str] = None, fewshot_path: Optional[str] = None,
                 subset: Optional[Sequence[str]] = None, split: Optional[str] = None,
                 hf_path: Optional[str] = None, hf_name: Optional[str] = None,
                 revision: Optional[str] = None) -> tuple[list[dict], dict]:
    """The rows of built-in task `name` and what to record about them.

    Args:
        n: the first n eval rows in file/split order (MMLU: the first n of each subject, lm-eval's --limit per
            subtask); None: all.
        few_shot: examples before each item (None: the task's default); picked as lm-eval picks them
            (`fewshot_draws`).
        path: a local .jsonl with the hub's fields, instead of the hub.
        fewshot_path: a local .jsonl for the few-shot examples (default: the hub's few-shot split). Needed when
            `path` is given and few_shot > 0: the eval rows are never their own examples' pool.
        subset: MMLU subjects (the ``subject`` field), e.g. ``["abstract_algebra", "anatomy"]``.
        split, hf_path, hf_name, revision: override the hub location (another hf_path drops the spec's hf_name).

    Returns:
        (rows, meta): rows in the kind's format with ids ``<name>/<index>``; meta has ``source``, ``sha256``,
        ``few_shot``, ``fewshot_source``, ``fewshot_sampler``, ``fewshot_seed``, ``fewshot_sample_sha256`` (of
        every item's example ids), ``fewshot_ids`` (item id -> example ids; None when over 5000 ids: the hash
        stands for them), ``split`` and (MMLU) ``subset``.
    """
    spec = BUILTINS.get(name, "eval: built-in task")
    k = spec.few_shot if few_shot is None else int(few_shot)
    if k < 0:
        raise ValueError(f"eval.tasks.{name}.few_shot: must be >= 0, got {k}")
    split = split or spec.split
    problem = fewshot_file_problem(name, k, path, fewshot_path)
    if problem:
        raise ValueError(problem)
    if path:
        key = f"eval.paths.{name}"
        records, wheres = _read_local(path, key)
        source, sha = f"file:{Path(path).expanduser().resolve()}", sha256_file(Path(path).expanduser())
    else:
        key = f"eval: task {name!r}"
        records = _read_hub(spec, split, hf_path, hf_name, revision, "eval rows")
        wheres = _hub_where(spec, split, hf_path, len(records))
        hub, config = _hub_location(spec, hf_path, hf_name)
        source, sha = f"hub:{hub}{'/' + config if config else ''}@{revision or 'main'}:{split}", _records_sha(records)

    # eval rows: (index in the split, record, row)
    indexed = []
    for i, rec in enumerate(records):
        if subset and spec.group is not None and spec.group(rec) not in subset:
            continue
        row = checked_row(spec, rec, wheres[i], key)
        if row is not None:
            indexed.append((i, rec, row))
    if subset and spec.group is None:
        raise ValueError(f"eval.tasks.{name}.subset: task {name!r} has no subsets (only mmlu does)")
    if subset:
        found = {spec.group(rec) for _, rec, _ in indexed}
        missing = [s for s in subset if s not in found]
        if missing:
            raise ValueError(f"eval.tasks.{name}.subset: no rows for {missing} in {source}")
    if spec.group is not None and n is not None:  # lm-eval runs each subject as a task of its own, --limit in each
        seen: dict[str, int] = {}
        kept = []
        for item in indexed:
            g = spec.group(item[1])
            seen[g] = seen.get(g, 0) + 1
            if seen[g] <= n:
                kept.append(item)
        indexed = kept
    elif n is not None:
        indexed = indexed[:n]
    if not indexed:
        raise ValueError(f"eval: task {name!r} has no rows in {source}")

    fewshot_source = fewshot_sha = None
    shots: dict[int, list[int]] = {}
    pool: list[tuple[str, dict]] = []  # (id, row)
    if k > 0:
        if fewshot_path:
            fkey = f"eval.tasks.{name}.fewshot_path"
            recs, fwheres = _read_local(fewshot_path, fkey)
            resolved = Path(fewshot_path).expanduser().resolve()
            fewshot_source, fewshot_sha = f"file:{resolved}", sha256_file(resolved)
            pool_ids = [f"{name}/fewshot/{i}" for i in range(len(recs))]
            same_split = bool(path) and resolved == Path(path).expanduser().resolve()
        elif spec.fewshot_split:
            fkey = f"eval: task {name!r} (few-shot split)"
            recs = _read_hub(spec, spec.fewshot_split, hf_path, hf_name, revision, "few-shot rows")
            fwheres = _hub_where(spec, spec.fewshot_split, hf_path, len(recs))
            fewshot_source = f"hub:{spec.fewshot_split}"
            pool_ids = [f"{name}/{spec.fewshot_split}/{i}" for i in range(len(recs))]
            same_split = spec.fewshot_split == split
        else:
            raise ValueError(f"eval.tasks.{name}.few_shot: task {name!r} has no few-shot split; set "
                             f"eval.tasks.{name}.fewshot_path=FILE.jsonl or eval.tasks.{name}.few_shot=0")
        kept_recs = []  # lm-eval's pool is every record of the split, in order; a record that is no item is refused
        for pid, rec, fwhere in zip(pool_ids, recs, fwheres):
            row = checked_row(spec, rec, fwhere, fkey)
            if row is not None:
                pool.append((pid, row))
                kept_recs.append(rec)
        shots = fewshot_draws(spec, k, records, {i for i, _, _ in indexed}, kept_recs, same_split, fewshot_source)

    rows, per_item = [], {}
    for i, rec, row in indexed:
        rid = f"{name}/{i}"
        prefix = spec.description(rec)
        if k > 0:
            examples = [pool[j] for j in shots[i]]
            per_item[rid] = [pid for pid, _ in examples]
            prefix += FEWSHOT_SEP.join(render_fewshot(spec.kind, ex) for _, ex in examples) + FEWSHOT_SEP
        out = {"id": rid, **with_prefix(row, prefix)}
        out.pop("response", None)
        rows.append(out)
    meta = {"source": source, "sha256": sha, "split": split if not path else None, "few_shot": k,
            "fewshot_source": fewshot_source}
    if k:
        meta.update(fewshot_sampler=spec.sampler, fewshot_seed=FEWSHOT_SEED if spec.sampler == "default" else None,
                    fewshot_sample_sha256=hashlib.sha256(json.dumps(per_item, sort_keys=True).encode()).hexdigest(),
                    fewshot_ids=per_item if k * len(per_item) <= 5000 else None)
    if fewshot_sha is not None:  # the few-shot file's content: in the task's signature, so in the base cache key
        meta["fewshot_sha256"] = fewshot_sha
    if subset:
        meta["subset"] = list(subset)
    return rows, meta
