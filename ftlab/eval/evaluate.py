"""Evaluation of a model on a list of tasks: predict, score, per-item records, the base-result cache.

The parts live beside it: tasks and kinds (`ftlab.eval.task`), the run's suites (`.suites`), prompt formats
(`.prompts`), the kinds' engines (`.generation`, `.perplexity`, `.multiple_choice`, `.lm_eval_adapter`), scoring
of saved predictions (`.scoring`) and the cache (`.cache`).
"""

from __future__ import annotations

from pathlib import Path

from ftlab.eval.cache import base_signature, cache_key, read_cached, write_cached
from ftlab.eval.prompts import tokenizer_signature
from ftlab.eval.scoring import MODEL_HINT, check_rows, checked_score
from ftlab.eval.task import KINDS, Task
from ftlab.utils.files import write_jsonl
from ftlab.utils.progress import Bar

__all__ = ["evaluate"]


def evaluate(model, tokenizer, tasks: list[Task], batch_size: int, *, stage: str, run_dir: Path,
             cache_dir: Path | None = None, fingerprint: str | None = None, compute: dict | None = None,
             progress: bool = True) -> dict[str, dict]:
    """Score every task; write records/<stage>/<task>.jsonl; return {task: {score, metrics, n, cached}}.

    With cache_dir and fingerprint (base evaluation), the kind's raw predictions are reused when everything that
    can change them is unchanged (ftlab.eval.cache: weights, model and generation config, the tokenizer's content
    and behaviour, the task's signature, the prediction code, the compute settings); they are scored again on every
    load, so scores always follow today's scoring code. Cached predictions today's scorer refuses are predicted
    again.

    An item that cannot be scored fails before the model runs, and a non-finite log-likelihood, NLL or metric
    from the model fails the task with the item named (ftlab.eval.scoring.checked_score; ValueError): a broken
    model never produces a score, and nothing of it is cached."""
    out: dict[str, dict] = {}
    sides = None
    bar = Bar(len(tasks), f"eval {stage}", "{task.fields[name]}", enabled=progress, name="")
    with bar:
        for task in tasks:
            if task.format == "chat":
                task.meta["chat_template"] = tokenizer_signature(tokenizer, "chat")["chat_template"]
            key = cached = None
            if cache_dir is not None and fingerprint is not None:
                if sides is None:  # once per evaluation: hashing a large tokenizer takes a moment
                    sides = base_signature(model, tokenizer)
                key = cache_key(task, fingerprint, compute=compute, sides=sides)
                cached = read_cached(cache_dir, key)
            if cached is not None:
                try:
                    metrics, items = checked_score(task, cached)
                except ValueError:  # predictions a changed scorer cannot read (a field it now needs): predict again
                    cached = None
            if cached is None:
                kind = KINDS.get(task.kind)
                check_rows(task)  # before the model runs
                preds = kind.predict(model, tokenizer, task, batch_size)
                metrics, items = checked_score(task, preds, hint=MODEL_HINT)
                if key is not None:
                    write_cached(cache_dir, key, task, preds)
            write_jsonl(Path(run_dir) / "records" / stage / f"{task.name}.jsonl", items)
            out[task.name] = {"score": metrics[task.metric], "metrics": metrics, "n": len(items),
                              "cached": cached is not None}
            bar.update(advance=1, name=task.name)
    return out
