"""The ``generation`` task kind: greedy decoding, answer extraction, exact match."""

from __future__ import annotations

from ftlab.config.names import KIND_METRICS
from ftlab.eval.prompts import apply_format
from ftlab.eval.scoring import by_id, mean
from ftlab.eval.task import Kind, Task, register_kind

__all__ = ["predict_generation", "score_generation"]


def predict_generation(model, tokenizer, task: Task, batch_size: int) -> list[dict]:
    from ftlab.models.generate import greedy_decode

    prompts = [apply_format(tokenizer, r["prompt"], task.format) for r in task.rows]
    preds = greedy_decode(model, tokenizer, prompts, task.max_new_tokens, batch_size=batch_size, stop=task.stop)
    return [{"id": r["id"], "prediction": p} for r, p in zip(task.rows, preds)]


def score_generation(task: Task, predictions: list[dict]) -> tuple[dict, list[dict]]:
    """exact_match (points) with `ftlab.data.answers.score(task.answer, prediction, reference)` per item."""
    from ftlab.data.answers import score

    preds = by_id(task, predictions, "prediction")
    items = []
    for r in task.rows:
        p = preds[r["id"]]["prediction"]
        items.append({"id": r["id"], "prompt": r["prompt"], "reference": r["reference"], "prediction": p,
                      "score": score(task.answer, p, r["reference"])})
    return {"exact_match": mean([i["score"] for i in items])}, items


register_kind(Kind("generation", KIND_METRICS["generation"], predict_generation, score_generation))
