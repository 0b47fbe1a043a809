"""The base-result cache: a task's scores on a base model, keyed by everything that can change them (model
weights, tokenizer, the task's signature, and how the model computes: precision, weight dtype, attention kernel,
device type and evaluation batch size — in bf16 these changed 4/24 and 9/24 base answers), so that every run of
a sweep on the same base evaluates it once."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional

from ftlab.eval.prompts import tokenizer_signature
from ftlab.eval.task import Task
from ftlab.utils.files import atomic_write_json

__all__ = ["cache_key", "compute_signature", "read_cached", "write_cached"]


def cache_key(task: Task, fingerprint: str, tokenizer=None, compute: Optional[dict] = None) -> str:
    """The base-result cache key: model weights, tokenizer, the task's signature, and the compute settings
    (`compute_signature`; absent keys are left out, so an entry keyed without them is a different entry)."""
    tok = tokenizer_signature(tokenizer, task.format) if tokenizer is not None else None
    payload = {"model": fingerprint, "tokenizer": tok, "task": task.signature()}
    if compute:
        payload["compute"] = compute
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def compute_signature(model, *, precision: str, device: str, batch_size: int) -> dict:
    """How a model computes its scores, beyond its weights: autocast precision, the weights' dtype, the attention
    kernel, the device type and the evaluation batch size (padding and kernel choice move results in the last
    bits, which flips near-tied answers in low precision)."""
    config = getattr(model, "config", None)
    dtype = next((str(p.dtype) for p in model.parameters()), None)
    return {"precision": precision, "dtype": dtype, "device": str(device).split(":")[0],
            "attn": getattr(config, "_attn_implementation", None), "batch_size": int(batch_size)}


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
