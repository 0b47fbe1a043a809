"""The base-result cache: a task's raw predictions on a base model, keyed by everything that can change them, so
that every run of a sweep on the same base evaluates it once.

The key (`cache_key`) covers the model's weights (their fingerprint), its config and generation config (stop
tokens), the tokenizer's full content and behaviour (`ftlab.eval.prompts.tokenizer_signature`), the task's
signature (rows with their few-shot blocks, n, metric, format, window, meta), the code that produces the task
kind's predictions (`prediction_code`, derived from the source) and how the model computes (`compute_signature`:
precision, weight dtype, attention kernel, device type and evaluation batch size — in bf16 these changed 4/24 and
9/24 base answers).

An entry holds what the kind's `predict` returned (log-likelihoods, generations, NLLs and token counts, lm-eval's
per-sample values), never scores: `ftlab.eval.evaluate` scores them again on every load with today's scorer, so a
fix to scoring (answer extraction, a metric, an aggregation) applies to cached bases without re-running them, and
only a change to prediction code misses.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import json
import math
from pathlib import Path
from typing import Optional

from ftlab.eval.prompts import tokenizer_signature
from ftlab.eval.task import KINDS, Task
from ftlab.utils.files import atomic_write_json

__all__ = ["cache_key", "base_signature", "model_signature", "prediction_code", "compute_signature",
           "read_cached", "write_cached", "PREDICTION_MODULES"]

# The code that decides what a model predicts, beside each kind's own module (hashed minus its scorer): prompt
# formats, the window (task.model_max_length), greedy decoding and its stops, the chunked output head, padding,
# the model-structure helpers (pad id, eval mode). Scoring code (ftlab.eval.scoring, ftlab.data.answers, each
# kind's score function) is not here: cached predictions are re-scored on load.
PREDICTION_MODULES = ("ftlab.eval.prompts", "ftlab.eval.task", "ftlab.models.generate", "ftlab.models.logits",
                      "ftlab.models.structure", "ftlab.utils.padding")

# Config keys that say where or by which version a model was saved, not how it computes (dtype and attention
# kernel are in compute_signature, read from the loaded model).
_VOLATILE = frozenset({"_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype",
                       "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
                       "_from_model_config"})


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def cache_key(task: Task, fingerprint: str, tokenizer=None, compute: Optional[dict] = None, model=None, *,
              sides: Optional[dict] = None) -> str:
    """The base-result cache key (see the module doc). `sides` is `base_signature(model, tokenizer)` computed
    once for many tasks (hashing a large tokenizer takes a moment); else it is computed here from `model` and
    `tokenizer` (either may be None: then that part is absent, and the key is another one)."""
    if sides is None:
        sides = base_signature(model, tokenizer)
    payload = {"model": fingerprint, **sides, "task": task.signature(), "prediction_code": prediction_code(task.kind)}
    if compute:
        payload["compute"] = compute
    return _sha(payload)[:24]


def base_signature(model, tokenizer) -> dict:
    """The model- and tokenizer-side parts of the key: {"tokenizer": tokenizer_signature, "model_config": ...}."""
    return {"tokenizer": tokenizer_signature(tokenizer) if tokenizer is not None else None,
            **(model_signature(model) if model is not None else {})}


def _without_volatile(d):
    if isinstance(d, dict):
        return {k: _without_volatile(v) for k, v in d.items() if k not in _VOLATILE}
    return d


def model_signature(model) -> dict:
    """The model's config (every key but those in _VOLATILE: the position limit sets the window, rope scaling,
    norm eps, tied embeddings ...) and its generation config, whose eos ids end greedy decoding (and whose other
    fields lm-eval's generation reads), as hashes; plus the eos ids themselves, for reading."""
    cfg = getattr(model, "config", None)
    gen = getattr(model, "generation_config", None)
    return {"model_config": _sha(_without_volatile(cfg.to_dict())) if cfg is not None else None,
            "generation_config": _sha(_without_volatile(gen.to_dict())) if gen is not None else None,
            "eos": getattr(gen, "eos_token_id", None)}


def _code(module, drop: frozenset = frozenset()) -> str:
    """A module's code as its syntax tree, without docstrings and without the top-level definitions in `drop`:
    comments, docstrings and formatting change no prediction, so they miss nothing."""
    tree = ast.parse(inspect.getsource(module))
    tree.body = [n for n in tree.body if getattr(n, "name", None) not in drop]
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def _reached(module, start: str) -> set[str]:
    """Names of the module's top-level definitions that `start` reaches through the names it uses."""
    tree = ast.parse(inspect.getsource(module))
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        todo += [n.id for n in ast.walk(defs[name]) if isinstance(n, ast.Name)]
    return seen


@functools.lru_cache(maxsize=None)
def prediction_code(kind: str) -> str:
    """sha256 of the source of what produces a kind's predictions: PREDICTION_MODULES and the module of the kind's
    predict function, less the definitions that only its score function reaches (a kind module holds both; a
    scoring fix must not discard cached bases). Replaces a hand-bumped version number, which was forgotten."""
    k = KINDS.get(kind)
    mod = importlib.import_module(k.predict.__module__)
    score_only = frozenset()
    if getattr(k.score, "__module__", None) == mod.__name__:
        score_only = frozenset(_reached(mod, k.score.__name__) - _reached(mod, k.predict.__name__))
    h = hashlib.sha256()
    for name in PREDICTION_MODULES:
        h.update(_code(importlib.import_module(name)).encode())
    h.update(_code(mod, score_only).encode())
    return h.hexdigest()


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
    if isinstance(x, (list, tuple)):
        return any(_non_finite(v) for v in x)
    return False


def read_cached(cache_dir: Path, key: str) -> Optional[list[dict]]:
    """The cached raw predictions under `key`; None when there are none, or the entry is damaged, of an older
    layout (scored items, no predictions), or holds a non-finite value: such an entry is recomputed, not trusted."""
    path = Path(cache_dir) / f"{key}.json"
    if not path.is_file():
        return None
    try:
        preds = json.loads(path.read_text())["predictions"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(preds, list) or not all(isinstance(p, dict) for p in preds) or _non_finite(preds):
        return None
    return preds


def write_cached(cache_dir: Path, key: str, task: Task, predictions: list[dict]) -> None:
    """Cache a base's raw predictions (atomically); a non-finite value is refused (ValueError), never written."""
    if _non_finite(predictions):
        raise ValueError(f"eval: task {task.name!r}: refusing to cache predictions with non-finite values")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(cache_dir) / f"{key}.json",
                      {"predictions": predictions, "signature": task.signature(), "prediction_code":
                       prediction_code(task.kind)})
