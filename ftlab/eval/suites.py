"""The tasks of a run (its target tasks and forgetting suite, from the eval config) and built-in tasks by name."""

from __future__ import annotations

from typing import Any, Optional

from ftlab.config.names import VALIDATION_SPLITS

# the built-in kinds register themselves on import: every task built here has a registered kind
from ftlab.eval import generation, multiple_choice, perplexity  # noqa: F401
from ftlab.eval.builtin import BUILTINS, load_builtin
from ftlab.eval.task import EVAL_SEED, FORMATS, Task

__all__ = ["build_tasks", "load_task", "first_items"]


def build_tasks(cfg: Any, split: str = "test") -> list[Task]:
    """The run's target tasks and forgetting suite, from the eval config.

    split="validation": the same tasks on their validation split (eval.validation; ftlab.config.checks
    .check_validation says which tasks have one), for hyperparameter selection that never reads the test split."""
    from ftlab.data.sources import load_eval

    e, limit = cfg.eval, cfg.eval.limit
    tasks: list[Task] = []
    for name in e.target:
        if name == "data":  # the held-out split of the training data; of every stage's data in a continual run
            # the prompt as training renders it (ftlab.train.batches.encode_example): plain, or the chat template's
            # user turn and generation prompt
            fmt = cfg.model.prompt_format
            if fmt not in FORMATS:
                raise ValueError(f"model.prompt_format: {fmt!r} is decided when the tokenizer loads "
                                 "(ftlab.models.loading.load_tokenizer); build the tasks of the resolved config")
            for d in getattr(cfg, "stages", None) or [cfg.data]:
                rows = load_eval(d, limit, EVAL_SEED, split=split)
                tasks.append(Task(d.name, "target", "generation",
                                  [{"id": r["id"], "prompt": r["prompt"], "reference": r["reference"]} for r in rows],
                                  answer=d.answer, max_new_tokens=d.max_new_tokens, format=fmt, stop=tuple(d.stop),
                                  # data.answer=number is any numeric data, not only answers ending in '#### N'
                                  # (lm-eval's strict_match and flexible_extract are reported beside it)
                                  metric="robust_match" if d.answer == "number" else "",
                                  meta={"source": d.source, "few_shot": 0, "format": fmt,
                                        **({"split": split} if split != "test" else {})}))
        else:
            tasks.append(_named_task(name, "target", cfg, split))
    for name in e.forget:
        if name == "world":
            tasks += [_named_task(f"synth_{s}", "forget", cfg, split) for s in cfg.model.world.skills]
            tasks.append(_named_task("synth_ppl", "forget", cfg, split))
        else:
            tasks.append(_named_task(name, "forget", cfg, split))
    names = [t.name for t in tasks]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"eval: task(s) {sorted(dup)} appear twice (as target and forget?)")
    return tasks


def _task_options(cfg: Any, name: str) -> dict:
    """eval.tasks.<name> (set fields only) and eval.paths.<name>, as load_task keyword arguments."""
    import dataclasses

    opts = getattr(cfg.eval, "tasks", {}) or {}
    o = opts.get(name)
    out = {k: v for k, v in (dataclasses.asdict(o) if dataclasses.is_dataclass(o) else dict(o or {})).items()
           if v is not None}
    path = (getattr(cfg.eval, "paths", {}) or {}).get(name)
    if path:
        out["path"] = path
    return out


def _named_task(name: str, role: str, cfg: Any, split: str = "test") -> Task:
    if split != "test" and name.startswith("lm_eval:"):
        raise ValueError(f"eval.validation: task {name!r} has no validation split (lm-eval tasks are scored on the "
                         "split their YAML names)")
    if name.startswith("lm_eval:"):
        from ftlab.eval.lm_eval_adapter import load_lm_eval_task

        o = cfg.eval.lm_eval
        return load_lm_eval_task(name[len("lm_eval:"):], role, n=cfg.eval.limit, include_path=o.include_path,
                                 num_fewshot=o.num_fewshot, metric=o.metric)
    if name in BUILTINS:
        opts = _task_options(cfg, name)
        opts.setdefault("n", cfg.eval.limit)
        if split != "test":
            if name not in VALIDATION_SPLITS or opts.get("path"):
                raise ValueError(f"eval.validation: task {name!r} has no validation split distinct from its "
                                 "evaluation split; drop it from the suite or set eval.validation=false")
            opts["split"] = VALIDATION_SPLITS[name]
        return load_task(name, role, **opts)

    from ftlab.world import skills

    n = cfg.eval.limit or 200
    if name == "synth_ppl":
        # Held-out pretraining examples, scored on their answers (what pretraining trained), skills interleaved.
        per = -(-n // len(cfg.model.world.skills))
        pools = [skills.make_examples(sk, split, per, seed=EVAL_SEED) for sk in cfg.model.world.skills]
        rows = [pool[j] for j in range(per) for pool in pools if j < len(pool)][:n]
        return Task(name, role, "perplexity",
                    [{"id": f"ppl-{r['id']}", "context": r["prompt"], "text": r["response"]} for r in rows],
                    meta={"source": "world", "scored": "answers", **({"split": split} if split != "test" else {})})
    if name.startswith("synth_") and name[6:] in skills.ALL_SKILLS:
        rows = skills.make_examples(name[6:], split, n, seed=EVAL_SEED)
        return Task(name, role, "generation",
                    [{"id": r["id"], "prompt": r["prompt"], "reference": r["response"]} for r in rows],
                    answer="exact", max_new_tokens=max(len(r["response"]) for r in rows) + 2,
                    meta={"source": "world", "few_shot": 0, "format": "plain",
                          **({"split": split} if split != "test" else {})})
    raise ValueError(f"eval: unknown task {name!r}; known here: data, world, synth_ppl, "
                     + ", ".join(f"synth_{s}" for s in skills.ALL_SKILLS) + ", " + ", ".join(BUILTINS))


def load_task(name: str, role: str = "target", *, n: Optional[int] = None, few_shot: Optional[int] = None,
              format: str = "plain", metric: Optional[str] = None, max_new_tokens: Optional[int] = None,
              max_length: Optional[int] = None, **source: Any) -> Task:
    """A built-in task (`ftlab.eval.builtin.BUILTINS`) as a `Task`.

    Args:
        name: arc_challenge, arc_easy, hellaswag, winogrande, boolq, mmlu, wikitext, wikitext_lines or gsm8k.
        role: target | forget.
        n: the first n rows (None: all); few_shot: examples per item (None: the task's default).
        format: plain | chat; metric: the primary metric (e.g. acc instead of acc_norm).
        max_new_tokens: generation cap (gsm8k); max_length: token window (perplexity, multiple choice; wikitext:
            None = the model's full length, as lm-eval).
        **source: path, fewshot_path, subset, split, hf_path, hf_name, revision (see `ftlab.eval.builtin.load_builtin`).
    """
    spec = BUILTINS.get(name, "eval: built-in task")  # ConfigError (a ValueError): did you mean
    rows, meta = load_builtin(name, n=n, few_shot=few_shot, **source)
    meta["format"] = format
    return Task(name, role, spec.kind, rows, answer=spec.answer,
                max_new_tokens=max_new_tokens or spec.max_new_tokens, meta=meta, metric=metric or spec.metric,
                format=format, delimiter=" " if format == "plain" else "", max_length=max_length, stop=spec.stop)


def first_items(tasks: list[Task], n: Optional[int]) -> list[Task]:
    """The tasks cut to their first n items (eval.curve_limit; None: unchanged), for the training curve."""
    import dataclasses

    if n is None:
        return list(tasks)
    return [dataclasses.replace(t, rows=t.rows[:n], meta=dict(t.meta)) for t in tasks]
