"""The ``lm_eval`` task kind: any lm-evaluation-harness task, run on the in-memory model (base and tuned).

Name a task ``lm_eval:<task>`` in ``eval.target`` / ``eval.forget`` (e.g. ``lm_eval:arc_easy``); local task
YAMLs are found through ``eval.lm_eval.include_path`` (a directory). lm-eval builds the prompts, few-shot
examples and requests; the model is wrapped in lm-eval's HF backend (``HFLM(pretrained=model)``), so nothing is
written to disk. The score is lm-eval's per-sample value of the chosen metric (default: the task's first
mean-aggregated metric), averaged and given in points (x100) — lm-eval's own aggregate for mean metrics.

Rows are the task's eval documents (the first n), so the base-result cache key covers the data, n, few-shot and
the task's configuration; per-item records hold lm-eval's ``doc_id``, target, filtered response and metric.
Needs ``pip install lm-eval`` (the ``dev`` extra has it).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from ftlab.eval.scoring import by_id, mean
from ftlab.eval.task import Kind, Task, register_kind

PREFIX = "lm_eval:"
__all__ = ["load_lm_eval_task", "PREFIX"]


def _task_object(name: str, include_path: Optional[str], num_fewshot: Optional[int]):
    """(task manager, lm-eval task object). With an include path, its YAMLs are indexed alone first (fast);
    lm-eval's own tasks are indexed only when the name is not found there."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:  # pragma: no cover - the dev extra installs it
        raise ImportError("eval: lm_eval:<task> needs lm-evaluation-harness: pip install lm-eval") from e
    tm = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if tm is None or name not in tm.all_subtasks:
        tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    if name not in tm.all_subtasks:
        raise ValueError(f"eval: lm-eval has no task {name!r}"
                         + (f" (include path {include_path})" if include_path else ""))
    loaded = tm.load([name]) if hasattr(tm, "load") else {"tasks": tm.load_task_or_group([name]), "groups": {}}
    objs = loaded["tasks"]
    if name not in objs or loaded.get("groups"):
        raise ValueError(f"eval: lm-eval {name!r} is a group or tag ({sorted(objs)}); name one task")
    task = objs[name]
    if num_fewshot is not None:
        task.set_config(key="num_fewshot", value=num_fewshot)
    return tm, task


def _primary_metric(task, metric: Optional[str]) -> tuple[str, bool]:
    listed = task.config.metric_list or []
    names = [m["metric"] for m in listed if isinstance(m.get("metric"), str)]
    agg = {m["metric"]: m.get("aggregation", "mean") for m in listed if isinstance(m.get("metric"), str)}
    hib = task.higher_is_better()
    if metric is None:
        means = [n for n in names if agg.get(n) == "mean"]
        if not means:
            raise ValueError(f"eval: lm-eval task {task.config.task!r} has no mean-aggregated metric ({names})")
        metric = means[0]
    elif metric not in names:
        raise ValueError(f"eval: lm-eval task {task.config.task!r} has no metric {metric!r}; it has {names}")
    if agg.get(metric, "mean") != "mean":
        raise ValueError(f"eval: metric {metric!r} of lm-eval task {task.config.task!r} is aggregated by "
                         f"{agg[metric]!r}; only mean-aggregated metrics are supported")
    return metric, bool(hib.get(metric, True))


def load_lm_eval_task(name: str, role: str = "target", *, n: Optional[int] = None,
                      include_path: Optional[str] = None, num_fewshot: Optional[int] = None,
                      metric: Optional[str] = None) -> Task:
    """An lm-evaluation-harness task as a ftlab `Task` of kind ``lm_eval`` (name without the ``lm_eval:``)."""
    import lm_eval

    _, obj = _task_object(name, include_path, num_fewshot)
    docs = list(obj.eval_docs)
    if n is not None:
        docs = docs[:n]
    metric, hib = _primary_metric(obj, metric)
    rows = [{"id": f"{PREFIX}{name}/{i}", "doc_id": i,
             "doc_sha": hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]}
            for i, d in enumerate(docs)]
    config = json.dumps(obj.dump_config(), sort_keys=True, default=str)
    meta = {"source": f"lm_eval:{name}", "lm_eval_version": lm_eval.__version__,
            "task_config_sha256": hashlib.sha256(config.encode()).hexdigest(), "include_path": include_path,
            "few_shot": obj.config.num_fewshot or 0, "format": "lm_eval", "higher_is_better": hib,
            "n_docs": len(docs), "limit": n}
    return Task(f"{PREFIX}{name}", role, "lm_eval", rows, meta=meta, metric=metric)


def predict_lm_eval(model, tokenizer, task: Task, batch_size: int) -> list[dict]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from ftlab.models.structure import eval_mode, model_device

    name = task.name[len(PREFIX):]
    tm, obj = _task_object(name, task.meta.get("include_path"), task.meta.get("few_shot"))
    with eval_mode(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model_device(model)))
        res = lm_eval.simple_evaluate(model=lm, tasks=[obj], task_manager=tm, limit=len(task.rows),
                                      log_samples=True, verbosity="ERROR")
    samples = res["samples"][name]
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        if s["doc_id"] >= len(task.rows):
            continue
        value = s.get(task.metric)
        out.append({"id": task.rows[s["doc_id"]]["id"], "value": value, "target": _plain(s.get("target")),
                    "response": _plain(s.get("filtered_resps"))})
    return out


def _plain(x: Any) -> Any:
    try:
        json.dumps(x)
        return x
    except TypeError:
        return str(x)


def score_lm_eval(task: Task, predictions: list[dict]) -> tuple[dict, list[dict]]:
    """The mean of lm-eval's per-sample metric value, in points (x100)."""
    preds = by_id(task, predictions, "value")
    items = []
    for r in task.rows:
        p = preds[r["id"]]
        v = float(p["value"])
        items.append({"id": r["id"], "doc_id": r["doc_id"], "target": p.get("target"),
                      "response": p.get("response"), "value": v, "score": 100.0 * v})
    return {task.metric: mean([i["score"] for i in items])}, items


register_kind(Kind("lm_eval", (), predict_lm_eval, score_lm_eval))
