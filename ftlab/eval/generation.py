"""The ``generation`` task kind: greedy decoding, answer extraction, exact match."""

from __future__ import annotations

from ftlab.config.names import KIND_METRICS
from ftlab.eval.prompts import apply_format
from ftlab.eval.scoring import by_id, mean
from ftlab.eval.task import Kind, Task, model_max_length, register_kind

__all__ = ["predict_generation", "score_generation"]


def predict_generation(model, tokenizer, task: Task, batch_size: int) -> list[dict]:
    """Greedy continuations. A prompt that would not leave room for `max_new_tokens` in the model's window keeps
    its last tokens (left truncation, as lm-eval); each prediction records how many prompt tokens were cut."""
    from ftlab.models.generate import greedy_decode

    prompts = [apply_format(tokenizer, r["prompt"], task.format) for r in task.rows]
    budget = model_max_length(model, task) - task.max_new_tokens
    if budget < 1:
        raise ValueError(f"eval: task {task.name!r}: max_new_tokens={task.max_new_tokens} leaves no room for a prompt "
                         f"in the model's window of {model_max_length(model, task)} tokens; lower it")
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    preds = greedy_decode(model, tokenizer, prompts, task.max_new_tokens, batch_size=batch_size, stop=task.stop,
                          max_prompt_tokens=budget)
    return [{"id": r["id"], "prediction": p, "prompt_tokens_cut": max(0, n - budget)}
            for r, p, n in zip(task.rows, preds, lengths)]


def score_generation(task: Task, predictions: list[dict]) -> tuple[dict, list[dict]]:
    """exact_match (points) with `ftlab.data.answers.score(task.answer, prediction, reference)` per item."""
    from ftlab.data.answers import score

    preds = by_id(task, predictions, "prediction")
    items = []
    for r in task.rows:
        p = preds[r["id"]]["prediction"]
        item = {"id": r["id"], "prompt": r["prompt"], "reference": r["reference"], "prediction": p,
                "score": score(task.answer, p, r["reference"])}
        if preds[r["id"]].get("prompt_tokens_cut"):
            item["prompt_tokens_cut"] = preds[r["id"]]["prompt_tokens_cut"]
        items.append(item)
    metrics = {"exact_match": mean([i["score"] for i in items])}
    cut = sum(1 for i in items if i.get("prompt_tokens_cut"))
    if cut:  # counted where it happened: prompts cut from the left to fit the window
        metrics["prompts_truncated"] = cut
    return metrics, items


register_kind(Kind("generation", KIND_METRICS["generation"], predict_generation, score_generation))
