"""Scoring saved predictions with a task's metric, exactly as `ftlab.eval.evaluate.evaluate` does (no model); the
checks that keep broken items, predictions and models from ever producing a score.

Every score, from a model (`evaluate`) or from a file (`ftlab score`), goes through `checked_score`: each item must
be scorable (`row_problem`: a multiple-choice item has at least 2 choices and an integer label in range; the fields
of its kind are present), each prediction well formed and finite (`prediction_problem`: log-likelihoods, NLLs and
lm-eval values are finite numbers, NLLs and token counts not negative, a generation is a text), and every metric
finite. A failure names the task and item (or the file and line) and the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from ftlab.eval.task import KINDS, Task

__all__ = ["score_predictions", "read_predictions", "read_predictions_at", "by_id", "mean", "checked_score",
           "check_rows", "check_predictions", "row_problem", "prediction_problem", "InvalidPrediction", "MODEL_HINT"]

# appended to a failure of predictions that came from a model (ftlab.eval.evaluate)
MODEL_HINT = ("; the model produced it (broken weights, or an overflow in its precision: try hw.precision=fp32); "
              "nothing was scored or cached")


class InvalidPrediction(ValueError):
    """An item, prediction or metric that cannot make a score: the message names where and which field."""


def _show(v: Any) -> str:
    text = repr(v) if not isinstance(v, float) else str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _texts(v: Any) -> bool:
    return isinstance(v, list) and len(v) >= 2 and all(isinstance(x, str) for x in v)


def row_problem(kind: str, row: Any) -> Optional[str]:
    """Why an item of task kind `kind` cannot be scored (a phrase naming the field), or None."""
    if not isinstance(row, dict):
        return f"an item must be an object, got {_show(row)}"
    if kind == "multiple_choice":
        if "contexts" in row:  # WinoGrande: one context per option, one continuation
            if not _texts(row["contexts"]):
                return f"field 'contexts' must list at least 2 texts (one per option), got {_show(row['contexts'])}"
            if not isinstance(row.get("continuation"), str):
                return f"field 'continuation' must be a text, got {_show(row.get('continuation'))}"
            n = len(row["contexts"])
        else:
            if not _texts(row.get("choices")):
                return f"field 'choices' must list at least 2 texts, got {_show(row.get('choices'))}"
            if not isinstance(row.get("context"), str):
                return f"field 'context' must be a text, got {_show(row.get('context'))}"
            n = len(row["choices"])
        label = row.get("label")
        if not _index(label):
            return f"field 'label' must be the index of the correct choice (an integer), got {_show(label)}"
        if not 0 <= label < n:
            return f"field 'label' {label} is out of range for {n} choices (0..{n - 1})"
    elif kind == "generation":
        for f in ("prompt", "reference"):
            if not isinstance(row.get(f), str):
                return f"field {f!r} must be a text, got {_show(row.get(f))}"
    elif kind in ("perplexity", "loglikelihood_rolling"):
        if not isinstance(row.get("text"), str):
            return f"field 'text' must be a text, got {_show(row.get('text'))}"
        if kind == "loglikelihood_rolling":  # what word and byte perplexity divide by: counts of the original text
            for f in ("n_words", "n_bytes"):
                if not (_index(row.get(f)) and row[f] >= 0):
                    return f"field {f!r} must be a count (an integer >= 0), got {_show(row.get(f))}"
    return None


def check_rows(task: Task) -> None:
    """Every item of `task` can be scored (`row_problem`); else InvalidPrediction naming the task and item."""
    for r in task.rows:
        problem = row_problem(task.kind, r)
        if problem:
            rid = r.get("id") if isinstance(r, dict) else None
            raise InvalidPrediction(f"eval: task {task.name!r} item {rid!r}: {problem}; it cannot be scored")


def prediction_problem(kind: str, p: Any) -> Optional[str]:
    """Why prediction `p` for an item of kind `kind` cannot be scored (a phrase naming the field), or None."""
    if not isinstance(p, dict):
        what = {list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(type(p), "a number")
        return f"{what}, not a JSON object with fields (one object per line)"
    if "id" not in p:
        return "field 'id' is missing"
    if not isinstance(p["id"], (str, int)) or isinstance(p["id"], bool):
        return f"field 'id' must be the item's id (a text), got {_show(p['id'])}"
    if kind == "generation":
        if "prediction" not in p:
            return "field 'prediction' is missing (the generated text)"
        if not isinstance(p["prediction"], str):
            return f"field 'prediction' must be the generated text (a JSON string), got {_show(p['prediction'])}"
    elif kind in ("perplexity", "loglikelihood_rolling"):
        # loglikelihood_rolling divides by the item's words and bytes: its token count is recorded, not needed
        for f in ("nll", "n_tokens") if kind == "perplexity" else ("nll",):
            if f not in p:
                return f"field {f!r} is missing (perplexity needs 'nll', the summed NLL, and 'n_tokens')"
        if not (_finite_number(p["nll"]) and p["nll"] >= 0):
            return f"field 'nll' must be a summed negative log-likelihood, a finite number >= 0, got {_show(p['nll'])}"
        if "n_tokens" in p and not (_index(p["n_tokens"]) and p["n_tokens"] >= 0):
            return f"field 'n_tokens' must be a count of tokens (an integer >= 0), got {_show(p['n_tokens'])}"
    elif kind == "multiple_choice":
        lls = p.get("loglikelihoods")
        if lls is None:
            if p.get("prediction") is None:
                return ("field 'loglikelihoods' is missing (one log-likelihood per choice; or 'prediction': the "
                        "chosen choice)")
        elif not isinstance(lls, list) or not lls:
            return f"field 'loglikelihoods' must be a list of numbers, one per choice, got {_show(lls)}"
        else:
            for j, x in enumerate(lls):
                if not _finite_number(x):
                    return f"field 'loglikelihoods'[{j}] is {_show(x)}, not a finite number"
    elif kind == "lm_eval":
        v = p.get("value")
        if isinstance(v, list):  # the per-sample tuple of a corpus-level aggregation (perplexity, f1, mcc, bleu)
            if not v or any(isinstance(x, float) and not math.isfinite(x) for x in v):
                return f"field 'value' must be lm-eval's per-sample value (finite numbers), got {_show(v)}"
        elif not _finite_number(v):
            return f"field 'value' must be a finite number (or lm-eval's per-sample tuple), got {_show(v)}"
    return None


def check_predictions(task: Task, predictions: list, where: Optional[list[str]] = None, hint: str = "") -> None:
    """Every prediction is well formed and finite (`prediction_problem`); else InvalidPrediction naming `where[i]`
    (e.g. "FILE:LINE") or the task and item, and the field. `hint` is appended (MODEL_HINT for a model's)."""
    choices = {r["id"]: len(r.get("contexts") or r.get("choices") or []) for r in task.rows
               if isinstance(r, dict) and "id" in r} if task.kind == "multiple_choice" else {}
    for i, p in enumerate(predictions):
        problem = prediction_problem(task.kind, p)
        if not problem and choices and isinstance(p.get("loglikelihoods"), list) and str(p["id"]) in choices:
            n = choices[str(p["id"])]
            if len(p["loglikelihoods"]) != n:
                problem = f"field 'loglikelihoods': {len(p['loglikelihoods'])} log-likelihoods for the item's {n} choices"
        if problem:
            at = where[i] if where is not None else \
                f"eval: task {task.name!r} item {p.get('id') if isinstance(p, dict) else i!r}"
            raise InvalidPrediction(f"{at}: {problem}{hint}")


def checked_score(task: Task, predictions: list, where: Optional[list[str]] = None,
                  hint: str = "") -> tuple[dict, list[dict]]:
    """The kind's score(task, predictions) after `check_rows` and `check_predictions`, refusing non-finite metrics."""
    check_rows(task)
    check_predictions(task, predictions, where, hint)
    try:
        metrics, items = KINDS.get(task.kind).score(task, predictions)
    except OverflowError:
        raise InvalidPrediction(f"eval: task {task.name!r}: {task.metric} overflows (mean NLL per token too large "
                                f"to exponentiate){hint}") from None
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise InvalidPrediction(f"eval: task {task.name!r}: metric(s) {bad} not finite{hint}")
    return metrics, items


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def by_id(task: Task, predictions: list[dict], needed: Optional[str]) -> dict[str, dict]:
    """The predictions by item id: every item of `task` exactly once, each with the field `needed`."""
    out: dict[str, dict] = {}
    for p in predictions:
        if "id" not in p:
            raise ValueError(f"predictions for {task.name!r}: a row has no 'id': {str(p)[:120]}")
        if needed is not None and needed not in p:
            raise ValueError(f"predictions for {task.name!r}: item {p['id']!r} has no {needed!r}")
        if p["id"] in out:
            raise ValueError(f"predictions for {task.name!r}: item {p['id']!r} appears twice")
        out[str(p["id"])] = p
    ids = [r["id"] for r in task.rows]
    missing = [i for i in ids if i not in out]
    if missing:
        raise ValueError(f"predictions for {task.name!r}: {len(missing)} of {len(ids)} items have no prediction "
                         f"(e.g. {missing[:3]}); ids look like {ids[0]!r}")
    extra = set(out) - set(ids)
    if extra:
        raise ValueError(f"predictions for {task.name!r}: {len(extra)} ids are not items of the task "
                         f"(e.g. {sorted(extra)[:3]}); ids look like {ids[0]!r}")
    return out


def score_predictions(task: Task, predictions: list[dict], where: Optional[list[str]] = None) -> dict:
    """Score saved predictions with the task's metric, exactly as `evaluate` does (no model needed).

    predictions: one dict per item of `task`, matched by ``id`` (every item exactly once):
      generation ``{"id", "prediction": text}``; perplexity ``{"id", "nll", "n_tokens"}``; loglikelihood_rolling
      ``{"id", "nll"}`` (the summed NLL of the whole text, natural log; lm-eval's -loglikelihood); multiple choice
      ``{"id", "loglikelihoods": [one per choice]}`` (or ``{"id", "prediction": index | choice text}``, acc
      only). Records written by `evaluate` (records/<stage>/<task>.jsonl) are valid predictions.
    where: per prediction, where it came from (e.g. "FILE:LINE", `read_predictions_at`), for error messages.

    Returns ``{"task", "metric", "score", "metrics", "n", "higher_is_better", "items"}``. Raises ValueError
    (InvalidPrediction) on an item or prediction that cannot be scored (`checked_score`).
    """
    metrics, items = checked_score(task, predictions, where)
    return {"task": task.name, "metric": task.metric, "score": metrics[task.metric], "metrics": metrics,
            "n": len(items), "higher_is_better": task.higher_is_better, "items": items}


def read_predictions(path: str | Path) -> list[dict]:
    """Rows of a .jsonl predictions file (or a .json list)."""
    return read_predictions_at(path)[0]


def read_predictions_at(path: str | Path) -> tuple[list, list[str]]:
    """(rows, where each came from: "FILE:LINE", or "FILE item N" in a .json list) of a predictions file; UTF-8
    (a byte-order mark is accepted). Rows are whatever each line holds: `check_predictions` says what is wrong."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); write the predictions as UTF-8 "
                         "JSON lines") from None
    if p.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{e.lineno} is not valid JSON ({e.msg})") from None
        return rows, [f"{p} item {i + 1}" for i in range(len(rows))]
    rows, where = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno} is not valid JSON ({e.msg}); one object per line") from None
            where.append(f"{p}:{lineno}")
    return rows, where
