"""The ``generation`` task kind: greedy decoding, answer extraction, exact match.

A task that reads its answer as text (``answer="exact"``) reports ``exact_match``. One that reads a number
(``answer="number"``: GSM8K) reports three metrics on every item (`ftlab.config.names.ANSWER_METRICS`):

- ``strict_match``: lm-evaluation-harness's gsm8k ``strict-match`` (the first ``#### N``), scored by its exact_match;
- ``flexible_extract``: its ``flexible-extract`` (the last number-like run), scored the same way;
- ``robust_match``: ftlab's lenient reading (`ftlab.data.answers.extract_number`: ``####``, ``\\boxed``, "the answer
  is", the last number; numbers compared by value), which credits answers lm-eval's filters do not.

lm-eval's two are compared with the row's ``target`` (the dataset's answer field as is, lm-eval's
``doc_to_target``) when the row has one, else with its ``reference``. The record of each item keeps what every
metric extracted (``extracted``) and its score (``scores``); ``score`` is the task's primary metric.
"""

from __future__ import annotations

from ftlab.config.names import ANSWER_METRICS, KIND_METRICS
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


def _number_scores(prediction: str, row: dict) -> tuple[dict, dict]:
    """(extracted, scores) of one prediction by the three number metrics."""
    from ftlab.data.answers import extract_number, lm_eval_exact_match, lm_eval_flexible, lm_eval_strict, score

    target = row.get("target", row["reference"])
    extracted = {"strict_match": lm_eval_strict(prediction), "flexible_extract": lm_eval_flexible(prediction),
                 "robust_match": extract_number(prediction)}
    scores = {"strict_match": lm_eval_exact_match(extracted["strict_match"], target),
              "flexible_extract": lm_eval_exact_match(extracted["flexible_extract"], target),
              "robust_match": score("number", prediction, row["reference"])}
    return extracted, scores


def score_generation(task: Task, predictions: list[dict]) -> tuple[dict, list[dict]]:
    """The metrics of `task.answer` (points; see the module doc) and one record per item."""
    from ftlab.data.answers import score

    names = ANSWER_METRICS.get(task.answer)
    if names is None:
        raise ValueError(f"task {task.name!r}: unknown answer kind {task.answer!r}; valid: {', '.join(ANSWER_METRICS)}")
    if task.metric not in names:
        raise ValueError(f"task {task.name!r}: metric {task.metric!r} is not reported for answer={task.answer!r} "
                         f"tasks; pick one of {', '.join(names)}")
    preds = by_id(task, predictions, "prediction")
    items = []
    for r in task.rows:
        p = preds[r["id"]]["prediction"]
        item = {"id": r["id"], "prompt": r["prompt"], "reference": r["reference"], "prediction": p}
        if task.answer == "number":
            item["extracted"], item["scores"] = _number_scores(p, r)
            item["score"] = item["scores"][task.metric]
        else:
            item["score"] = score(task.answer, p, r["reference"])
        if preds[r["id"]].get("prompt_tokens_cut"):
            item["prompt_tokens_cut"] = preds[r["id"]]["prompt_tokens_cut"]
        items.append(item)
    if task.answer == "number":
        metrics = {m: mean([i["scores"][m] for i in items]) for m in names}
    else:
        metrics = {"exact_match": mean([i["score"] for i in items])}
    cut = sum(1 for i in items if i.get("prompt_tokens_cut"))
    if cut:  # counted where it happened: prompts cut from the left to fit the window
        metrics["prompts_truncated"] = cut
    return metrics, items


register_kind(Kind("generation", KIND_METRICS["generation"], predict_generation, score_generation))
