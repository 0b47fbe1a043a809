"""Few-shot examples as lm-evaluation-harness 0.4.13 picks and renders them (its api/samplers.py and
api/task.py fewshot_context): which pool rows precede each item, and how a solved example reads. Pure Python;
ftlab.eval.builtin loads the rows and calls these."""

from __future__ import annotations

import random
from typing import Any

__all__ = ["FEWSHOT_SEED", "FEWSHOT_SEP", "fewshot_draws", "render_fewshot", "with_prefix"]

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_seed
FEWSHOT_SEP = "\n\n"  # lm-eval's default fewshot_delimiter, also after the last example


def render_fewshot(spec_kind: str, row: dict, delimiter: str = " ") -> str:
    """A solved example as it appears in a few-shot block: the context followed by its correct continuation."""
    if spec_kind == "generation":
        return row["prompt"] + row["response"]
    if "contexts" in row:
        return row["contexts"][row["label"]] + delimiter + row["continuation"]
    return row["context"] + delimiter + row["choices"][row["label"]]


def with_prefix(row: dict, prefix: str) -> dict:
    """`row` with `prefix` (description and few-shot block) before its context(s) or prompt."""
    if not prefix:
        return row
    out = dict(row)
    for k in ("context", "prompt"):
        if k in out:
            out[k] = prefix + out[k]
    if "contexts" in out:
        out["contexts"] = [prefix + c for c in out["contexts"]]
    return out


def fewshot_draws(spec: Any, k: int, docs: list[dict], wanted: set[int], pool: list[dict],
                  same_split: bool, source: str) -> dict[int, list[int]]:
    """Which pool rows precede each wanted doc: {doc index: [pool index, ...]}, as lm-evaluation-harness 0.4.13
    picks them (api/samplers.py, api/task.py fewshot_context).

    `spec` is the task's ftlab.eval.builtin.Builtin (its name, sampler, group, fewshot_drop_item); `docs` are the
    task's eval documents in dataset order, `pool` its few-shot split in dataset order.
    - sampler "default" (ContextSampler): one random.Random(FEWSHOT_SEED) per task, seeded once, then one
      ``rnd.sample(pool, k)`` per doc in doc order. The draw of doc i is the i-th draw whatever the limit, so every
      doc before the last wanted one is drawn for too (and thrown away) to keep the sequence. When lm-eval passes
      the doc to its sampler (`same_split`, or spec.fewshot_drop_item), it draws k+1, removes the doc itself (by
      equality) and keeps the first k, and resamples k from the pool without the doc's copies if duplicates left
      fewer.
    - sampler "first_n" (MMLU): the first k pool rows of the doc's group (subject), in order; the doc itself
      removed first when the splits are the same.
    random.sample picks by position only, so sampling indices gives lm-eval's documents."""
    if k <= 0:
        return {}
    group = spec.group or (lambda rec: "")
    out: dict[int, list[int]] = {}
    if spec.sampler == "first_n":
        by_group: dict[str, list[int]] = {}
        for j, rec in enumerate(pool):
            by_group.setdefault(group(rec), []).append(j)
        for i in sorted(wanted):
            cands = [j for j in by_group.get(group(docs[i]), []) if not (same_split and pool[j] == docs[i])]
            if len(cands) < k:
                raise ValueError(f"eval.tasks.{spec.name}.few_shot: {k} examples asked for, only {len(cands)} "
                                 f"available for {group(docs[i])!r} in {source}")
            out[i] = cands[:k]
        return out
    if spec.sampler != "default":
        raise ValueError(f"built-in task {spec.name!r}: unknown few-shot sampler {spec.sampler!r}")
    with_item = same_split or spec.fewshot_drop_item
    if len(pool) < k + with_item:
        raise ValueError(f"eval.tasks.{spec.name}.few_shot: {k} examples asked for, only {len(pool) - with_item} "
                         f"available in {source} (lm-eval draws {k + with_item} per item)")
    rnd = random.Random(FEWSHOT_SEED)
    everything = range(len(pool))
    for i in range(max(wanted) + 1 if wanted else 0):
        if not with_item:
            draw = rnd.sample(everything, k)
        else:
            draw = [j for j in rnd.sample(everything, k + 1) if pool[j] != docs[i]][:k]
            if len(draw) < k:
                others = [j for j in everything if pool[j] != docs[i]]
                if len(others) < k:
                    raise ValueError(f"eval.tasks.{spec.name}.few_shot: {k} examples asked for, only {len(others)} "
                                     f"differ from item {i} in {source}")
                draw = rnd.sample(others, k)
        if i in wanted:
            out[i] = draw
    return out
