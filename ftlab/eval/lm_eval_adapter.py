"""The ``lm_eval`` task kind: any lm-evaluation-harness task, run on the in-memory model (base and tuned).

Name a task ``lm_eval:<task>`` in ``eval.target`` / ``eval.forget`` (e.g. ``lm_eval:arc_easy``); local task
YAMLs are found through ``eval.lm_eval.include_path`` (a directory). lm-eval builds the prompts, few-shot
examples and requests; the model is wrapped in lm-eval's HF backend (``HFLM(pretrained=model)``), so nothing is
written to disk. The prediction is lm-eval's per-sample value of the chosen metric (default: acc_norm when the
task has it, else its first metric); the score is lm-eval's registered aggregation of those values, with the
metric's direction from the task; accuracy-like values in [0, 1] are given in points (x100), others (perplexities,
bits per byte, MCC ...) as lm-eval reports them (`_REPORTED`, Task.unit).

Rows are the task's eval documents (the first n) with a hash of each one's requests (its few-shot context
included), so the base-result cache key covers the data, n, the few-shot sample and the task's configuration
(`task_config_sha256`: its !function entries by module.qualname and source hash, the same in every process);
per-item records hold lm-eval's ``doc_id``, target, filtered response and per-sample value.
Needs ``pip install lm-eval`` (the ``dev`` extra has it).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from typing import Any, Optional

from ftlab.eval.scoring import by_id
from ftlab.eval.task import Kind, Task, register_kind

PREFIX = "lm_eval:"
__all__ = ["load_lm_eval_task", "task_config_sha256", "PREFIX"]


def _task_object(name: str, include_path: Optional[str], num_fewshot: Optional[int]):
    """(task manager, lm-eval task object). With an include path, its YAMLs are indexed alone first (fast);
    lm-eval's own tasks are indexed only when the name is not found there."""
    try:
        import lm_eval
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
    # the few-shot seed simple_evaluate sets (predict_lm_eval runs it): without it, prompts built here to key the
    # cache drew their examples from an unseeded generator, another draw in every process
    task.set_fewshot_seed(seed=inspect.signature(lm_eval.simple_evaluate).parameters["fewshot_random_seed"].default)
    return tm, task


# How each of lm-eval's registered aggregations is reported: (unit, scale). Accuracy-like metrics whose value lies
# in [0, 1] (a mean of per-sample 0/1 or [0, 1] values: acc, acc_norm, exact_match ...; f1) are given in points
# (x100), like ftlab's own tasks; everything else as lm-eval reports it: perplexities (unit ppl: forget tasks of
# this unit enter forget_ppl_change_pct), bits per byte, MCC ([-1, 1]), Brier score, and BLEU/chrF/TER, which
# sacrebleu already gives on a 0-100 scale. An aggregation not listed (a task's own !function) is reported as is.
_MEAN_LIKE = ("mean", "nanmean", "median")
_REPORTED = {"f1": ("points", 100.0), "perplexity": ("ppl", 1.0), "weighted_perplexity": ("ppl", 1.0),
             "bits_per_byte": ("bits/byte", 1.0), "matthews_corrcoef": ("mcc", 1.0),
             "brier_score": ("brier", 1.0), "bleu": ("points", 1.0), "chrf": ("points", 1.0),
             "chrf++": ("points", 1.0), "ter": ("ter", 1.0), **{a: ("points", 100.0) for a in _MEAN_LIKE}}


def _aggregation_name(fn) -> str:
    """The name lm-eval registered an aggregation function under; else "module.qualname" (a task's own)."""
    from lm_eval.api.registry import AGGREGATION_REGISTRY, get_aggregation

    get_aggregation("mean")  # fills the registry on first use
    for name, f in AGGREGATION_REGISTRY.items():
        if f is fn:
            return name
    return _function_id(fn)["function"]


def _default_aggregation(metric: str) -> Optional[str]:
    """The aggregation lm-eval registers for a metric name (f1 -> "f1"): a task's own aggregation of a known metric
    (super_glue cb's macro f1) is reported as that metric is."""
    from lm_eval.api.registry import METRIC_AGGREGATION_REGISTRY, get_metric_aggregation

    get_metric_aggregation("acc")  # fills the registry on first use
    fn = METRIC_AGGREGATION_REGISTRY.get(metric, None)
    return _aggregation_name(fn) if fn is not None else None


def _filters(task) -> list[str]:
    return [f.name for f in getattr(task, "_filters", None) or []] or ["none"]


def _primary_metric(task, metric: Optional[str]) -> dict:
    """The primary metric of an lm-eval task object and how it is reported: {metric, filter, aggregation, unit,
    scale, higher_is_better}, all from the task: its registered aggregation (task.aggregation()) and direction
    (task.higher_is_better()). Default: acc_norm when the task has it (ftlab's built-in ARC and HellaSwag report
    acc_norm, as the Open LLM Leaderboard does), else the task's first metric. A metric may name a filter
    (``exact_match,flexible-extract``); default: the task's first filter."""
    aggs, hib = task.aggregation(), task.higher_is_better()
    names, filters = list(aggs), _filters(task)
    name = task.config.task
    if metric is None:
        metric = "acc_norm" if "acc_norm" in names else (names[0] if names else None)
        if metric is None:
            raise ValueError(f"eval: lm-eval task {name!r} defines no metric")
    metric, _, flt = metric.partition(",")
    if metric not in names:
        raise ValueError(f"eval: lm-eval task {name!r} has no metric {metric!r}; set eval.lm_eval.metric to one "
                         f"of {names}")
    flt = flt or filters[0]
    if flt not in filters:
        raise ValueError(f"eval: lm-eval task {name!r} has no filter {flt!r} (eval.lm_eval.metric="
                         f"{metric},{flt}); its filters: {filters}")
    if hib.get(metric) is None:
        raise ValueError(f"eval: lm-eval task {name!r} does not say whether a higher {metric!r} is better (its "
                         "metric_list needs higher_is_better); ftlab cannot tell gain from loss without it")
    agg = _aggregation_name(aggs[metric])
    unit, scale = _REPORTED.get(agg) or _REPORTED.get(_default_aggregation(metric)) or ("value", 1.0)
    return {"metric": metric, "filter": flt, "aggregation": agg, "unit": unit, "scale": scale,
            "higher_is_better": bool(hib[metric])}


def _function_id(fn) -> dict:
    """A callable as what it is, the same in every process: module.qualname and a hash of its source (a repr
    holds the memory address, which put a new cache key in every process)."""
    fn = getattr(fn, "func", fn)  # functools.partial
    ident = f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        src = ""
    return {"function": ident, "source_sha256": hashlib.sha256(src.encode()).hexdigest()}


def _stable(x: Any) -> Any:
    """A task config as JSON-able data with no memory addresses: callables by `_function_id`, other objects by
    type and their repr without addresses."""
    if isinstance(x, dict):
        return {str(k): _stable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_stable(v) for v in x]
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    if callable(x):
        return _function_id(x)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(x).__module__}.{type(x).__qualname__}:{x!r}")


def task_config_sha256(obj) -> str:
    """sha256 of an lm-eval task's configuration, stable across processes."""
    return hashlib.sha256(json.dumps(_stable(obj.dump_config()), sort_keys=True).encode()).hexdigest()


def _prompt_shas(obj, n: int) -> list[str]:
    """Per eval document, a hash of its requests as lm-eval builds them (the context with its few-shot examples,
    the continuations): the few-shot sample is part of the cache key."""
    obj.build_all_requests(limit=n, rank=0, world_size=1)
    per_doc: dict[int, list] = {}
    for inst in sorted(obj.instances, key=lambda i: (i.doc_id, i.idx)):
        per_doc.setdefault(inst.doc_id, []).append(_jsonable(inst.arguments))
    return [hashlib.sha256(json.dumps(per_doc.get(i, []), default=str).encode()).hexdigest()[:16] for i in range(n)]


def load_lm_eval_task(name: str, role: str = "target", *, n: Optional[int] = None,
                      include_path: Optional[str] = None, num_fewshot: Optional[int] = None,
                      metric: Optional[str] = None) -> Task:
    """An lm-evaluation-harness task as a ftlab `Task` of kind ``lm_eval`` (name without the ``lm_eval:``)."""
    import lm_eval

    _, obj = _task_object(name, include_path, num_fewshot)
    docs = list(obj.eval_docs)
    if n is not None:
        docs = docs[:n]
    primary = _primary_metric(obj, metric)
    config_sha = task_config_sha256(obj)
    prompts = _prompt_shas(obj, len(docs))
    rows = [{"id": f"{PREFIX}{name}/{i}", "doc_id": i,
             "doc_sha": hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16],
             "prompt_sha": p}
            for i, (d, p) in enumerate(zip(docs, prompts))]
    meta = {"source": f"lm_eval:{name}", "lm_eval_version": lm_eval.__version__,
            "task_config_sha256": config_sha, "include_path": include_path,
            "few_shot": obj.config.num_fewshot or 0, "format": "lm_eval", "n_docs": len(docs), "limit": n,
            **{k: primary[k] for k in ("filter", "aggregation", "unit", "scale", "higher_is_better")}}
    return Task(f"{PREFIX}{name}", role, "lm_eval", rows, meta=meta, metric=primary["metric"])


def predict_lm_eval(model, tokenizer, task: Task, batch_size: int) -> list[dict]:
    """lm-eval's per-sample value of the task's metric (under its filter) for every document: a number, or the
    tuple a corpus-level aggregation reads (as a list), with the target and filtered response."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from ftlab.models.structure import eval_mode, model_device

    name = task.name[len(PREFIX):]
    tm, obj = _task_object(name, task.meta.get("include_path"), task.meta.get("few_shot"))
    with eval_mode(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model_device(model)))
        res = lm_eval.simple_evaluate(model=lm, tasks=[obj], task_manager=tm, limit=len(task.rows),
                                      log_samples=True, verbosity="ERROR", bootstrap_iters=0)
    flt = task.meta.get("filter", "none")
    samples = [s for s in res["samples"][name] if s.get("filter", flt) == flt]
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        if s["doc_id"] >= len(task.rows):
            continue
        out.append({"id": task.rows[s["doc_id"]]["id"], "value": _jsonable(s.get(task.metric)),
                    "target": _plain(s.get("target")), "response": _plain(s.get("filtered_resps"))})
    return out


def _jsonable(x: Any) -> Any:
    """lm-eval's values as JSON data: tuples as lists, numpy scalars as Python numbers (a cached value and a fresh
    one are then the same thing)."""
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if hasattr(x, "item") and callable(x.item) and not isinstance(x, (str, bytes)):
        try:
            return x.item()
        except (TypeError, ValueError):
            return str(x)
    return x


def _plain(x: Any) -> Any:
    try:
        json.dumps(x)
        return x
    except TypeError:
        return str(x)


def _aggregate(task: Task):
    """The aggregation function the task registered for its metric (a task's own !function from its task object)."""
    from lm_eval.api.registry import get_aggregation

    name = task.meta["aggregation"]
    fn = get_aggregation(name) if "." not in name else None
    if fn is None:
        obj = _task_object(task.name[len(PREFIX):], task.meta.get("include_path"), task.meta.get("few_shot"))[1]
        fn = obj.aggregation()[task.metric]
    return fn


def score_lm_eval(task: Task, predictions: list[dict]) -> tuple[dict, list[dict]]:
    """The task's metric aggregated by lm-eval's own aggregation for it (a mean, a perplexity over (loglikelihood,
    words) pairs, f1/MCC over (gold, prediction) pairs, corpus BLEU ...), in points (x100) when it is an
    accuracy-like value in [0, 1], else as lm-eval reports it (meta unit and scale, `_REPORTED`)."""
    from ftlab.eval.scoring import InvalidPrediction

    if "aggregation" not in task.meta:
        raise ValueError(f"eval: task {task.name!r} was built without its lm-eval aggregation; load it with "
                         "ftlab.eval.lm_eval_adapter.load_lm_eval_task")
    preds = by_id(task, predictions, "value")
    scale, mean_like = float(task.meta.get("scale", 1.0)), task.meta["aggregation"] in _MEAN_LIKE
    items, values = [], []
    for r in task.rows:
        p = preds[r["id"]]
        v = _jsonable(p["value"])
        if mean_like and scale != 1.0 and not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
            raise InvalidPrediction(
                f"eval: task {task.name!r} item {r['id']!r}: {task.metric} is {v!r}, outside [0, 1]: not a "
                f"proportion, so it cannot be given in points; choose another metric (eval.lm_eval.metric)")
        values.append(v)
        items.append({"id": r["id"], "doc_id": r["doc_id"], "target": p.get("target"), "response": p.get("response"),
                      "value": v, **({"score": scale * float(v)} if mean_like else {})})
    value = float(_aggregate(task)(values)) if values else float("nan")
    if scale != 1.0 and not 0.0 <= value <= 1.0:  # a wrong number is worse than none
        raise InvalidPrediction(f"eval: task {task.name!r}: {task.metric} aggregates to {value!r}, outside [0, 1]: "
                                "not a proportion, so it cannot be given in points; choose another metric "
                                "(eval.lm_eval.metric)")
    return {task.metric: value * scale}, items


register_kind(Kind("lm_eval", (), predict_lm_eval, score_lm_eval))
