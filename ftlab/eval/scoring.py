"""Scoring saved predictions with a task's metric, exactly as `ftlab.eval.evaluate.evaluate` does (no model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ftlab.eval.task import KINDS, Task

__all__ = ["score_predictions", "read_predictions", "by_id", "mean"]


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


def score_predictions(task: Task, predictions: list[dict]) -> dict:
    """Score saved predictions with the task's metric, exactly as `evaluate` does (no model needed).

    predictions: one dict per item of `task`, matched by ``id`` (every item exactly once):
      generation ``{"id", "prediction": text}``; perplexity ``{"id", "nll", "n_tokens"}``; multiple choice
      ``{"id", "loglikelihoods": [one per choice]}`` (or ``{"id", "prediction": index | choice text}``, acc
      only). Records written by `evaluate` (records/<stage>/<task>.jsonl) are valid predictions.

    Returns ``{"task", "metric", "score", "metrics", "n", "higher_is_better", "items"}``.
    """
    metrics, items = KINDS.get(task.kind).score(task, predictions)
    return {"task": task.name, "metric": task.metric, "score": metrics[task.metric], "metrics": metrics,
            "n": len(items), "higher_is_better": task.higher_is_better, "items": items}


def read_predictions(path: str | Path) -> list[dict]:
    """Rows of a .jsonl predictions file (or a .json list)."""
    p = Path(path).expanduser()
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno} is not valid JSON ({e.msg}); one object per line") from None
    return rows
