"""The base-result cache: a task's scores on a base model, keyed by everything that can change them (model
weights, tokenizer, the task's signature), so that every run of a sweep on the same base evaluates it once."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional

from ftlab.eval.prompts import tokenizer_signature
from ftlab.eval.task import Task
from ftlab.utils.files import atomic_write_json

__all__ = ["cache_key", "read_cached", "write_cached"]


def cache_key(task: Task, fingerprint: str, tokenizer=None) -> str:
    """The base-result cache key: model weights, tokenizer, and the task's signature."""
    tok = tokenizer_signature(tokenizer, task.format) if tokenizer is not None else None
    return hashlib.sha256(json.dumps({"model": fingerprint, "tokenizer": tok, "task": task.signature()},
                                     sort_keys=True, default=str).encode()).hexdigest()[:24]


def _non_finite(x) -> bool:
    """Any float in x (numbers, lists and dicts of them) that is NaN or infinite."""
    if isinstance(x, float):
        return not math.isfinite(x)
    if isinstance(x, dict):
        return any(_non_finite(v) for v in x.values())
    if isinstance(x, list):
        return any(_non_finite(v) for v in x)
    return False


def read_cached(cache_dir: Path, key: str) -> Optional[dict]:
    """The cached result {score, metrics, items, signature} under `key`; None when there is none, or it is damaged
    or holds a non-finite value (NaN log-likelihoods of a broken model, cached by older versions): such an entry
    is recomputed, not trusted."""
    path = Path(cache_dir) / f"{key}.json"
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
        cached["metrics"]  # noqa: B018 - entries of older versions lack it
        if _non_finite(cached["score"]) or _non_finite(cached["metrics"]) or _non_finite(cached["items"]):
            return None
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return cached


def write_cached(cache_dir: Path, key: str, task: Task, metrics: dict, items: list[dict]) -> None:
    """Cache a base result; a non-finite metric or item value is refused (ValueError), never written."""
    if _non_finite(metrics) or _non_finite(items):
        raise ValueError(f"eval: task {task.name!r}: refusing to cache a result with non-finite values")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(cache_dir) / f"{key}.json",
                      {"score": metrics[task.metric], "metrics": metrics, "items": items,
                       "signature": task.signature()})
