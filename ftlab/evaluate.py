"""Evaluation: tasks of two kinds here (generation with answer extraction, perplexity), per-item records,
and a cache of base-model results keyed by everything that can change them."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftlab.progress import Bar
from ftlab.record import atomic_write_json, write_jsonl

# Bump when scoring or prompting changes meaning: cached base results of older versions are not reused.
EVAL_VERSION = 1
EVAL_SEED = 0  # eval sets do not depend on the run seed: every run of a sweep is scored on the same items


@dataclass
class Task:
    name: str
    role: str  # target | forget
    kind: str  # generation | perplexity
    rows: list[dict]  # generation: {id, prompt, reference}; perplexity: {id, text}
    answer: str = "exact"  # generation: how a prediction is read (exact | number)
    max_new_tokens: int = 16
    meta: dict = field(default_factory=dict)  # recorded with the score (few-shot, format, source)

    @property
    def metric(self) -> str:
        return "exact_match" if self.kind == "generation" else "perplexity"

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "generation"

    @property
    def unit(self) -> str:
        return "points" if self.kind == "generation" else "ppl"

    def signature(self) -> dict:
        """Everything about the task that can change its score."""
        rows = hashlib.sha256(json.dumps(self.rows, sort_keys=True).encode()).hexdigest()
        return {"name": self.name, "kind": self.kind, "answer": self.answer, "max_new_tokens": self.max_new_tokens,
                "rows": rows, "n": len(self.rows), "meta": self.meta, "eval_version": EVAL_VERSION}


# ---------------------------------------------------------------------------------------------- task lists
def build_tasks(cfg: Any) -> list[Task]:
    """The run's target tasks and forgetting suite, from the eval config."""
    from ftlab.data import load_eval

    e, limit = cfg.eval, cfg.eval.limit
    tasks: list[Task] = []
    for name in e.target:
        if name == "data":
            rows = load_eval(cfg.data, limit, EVAL_SEED)
            tasks.append(Task(cfg.data.name, "target", "generation",
                              [{"id": r["id"], "prompt": r["prompt"], "reference": r["reference"]} for r in rows],
                              answer=cfg.data.answer, max_new_tokens=cfg.data.max_new_tokens,
                              meta={"source": cfg.data.source, "few_shot": 0, "format": cfg.model.prompt_format}))
        else:
            tasks.append(_named_task(name, "target", cfg))
    for name in e.forget:
        if name == "world":
            tasks += [_named_task(f"synth_{s}", "forget", cfg) for s in cfg.model.world.skills]
            tasks.append(_named_task("synth_ppl", "forget", cfg))
        else:
            tasks.append(_named_task(name, "forget", cfg))
    names = [t.name for t in tasks]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"eval: task(s) {sorted(dup)} appear twice (as target and forget?)")
    return tasks


def _named_task(name: str, role: str, cfg: Any) -> Task:
    from ftlab.world import skills

    n = cfg.eval.limit or 200
    if name == "synth_ppl":
        texts = skills.pretrain_text("test", n, seed=EVAL_SEED, skills=list(cfg.model.world.skills))
        return Task(name, role, "perplexity", [{"id": f"ppl-{i}", "text": t} for i, t in enumerate(texts)],
                    meta={"source": "world"})
    if name.startswith("synth_") and name[6:] in skills.ALL_SKILLS:
        rows = skills.make_examples(name[6:], "test", n, seed=EVAL_SEED)
        return Task(name, role, "generation",
                    [{"id": r["id"], "prompt": r["prompt"], "reference": r["response"]} for r in rows],
                    answer="exact", max_new_tokens=max(len(r["response"]) for r in rows) + 2,
                    meta={"source": "world", "few_shot": 0, "format": "plain"})
    raise ValueError(f"eval: unknown task {name!r}; known here: data, world, synth_ppl, "
                     + ", ".join(f"synth_{s}" for s in skills.ALL_SKILLS))


# ------------------------------------------------------------------------------------------------- scoring
def score_generation(model, tokenizer, task: Task, batch_size: int) -> tuple[float, list[dict]]:
    from ftlab.answers import score
    from ftlab.generate import greedy_decode

    preds = greedy_decode(model, tokenizer, [r["prompt"] for r in task.rows], task.max_new_tokens,
                          batch_size=batch_size)
    items = []
    for r, p in zip(task.rows, preds):
        items.append({"id": r["id"], "prompt": r["prompt"], "reference": r["reference"], "prediction": p,
                      "score": score(task.answer, p, r["reference"])})
    return sum(i["score"] for i in items) / max(len(items), 1), items


@torch.inference_mode()
def score_perplexity(model, tokenizer, task: Task, batch_size: int) -> tuple[float, list[dict]]:
    """Corpus perplexity exp(sum NLL / sum tokens); every token after the first is predicted."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    items = []
    try:
        for start in range(0, len(task.rows), batch_size):
            chunk = task.rows[start:start + batch_size]
            enc = [tokenizer(r["text"], add_special_tokens=True)["input_ids"] for r in chunk]
            width = max(map(len, enc))
            ids = torch.full((len(enc), width), pad, dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for i, e in enumerate(enc):
                ids[i, :len(e)] = torch.tensor(e)
                mask[i, :len(e)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            nll = (nll * mask[:, 1:]).sum(-1)
            for r, e, v in zip(chunk, enc, nll.tolist()):
                items.append({"id": r["id"], "nll": v, "n_tokens": len(e) - 1})
    finally:
        model.train(was_training)
    total = sum(i["nll"] for i in items)
    count = sum(i["n_tokens"] for i in items)
    return (math.exp(total / count) if count else float("nan")), items


def evaluate(model, tokenizer, tasks: list[Task], batch_size: int, *, stage: str, run_dir: Path,
             cache_dir: Path | None = None, fingerprint: str | None = None,
             progress: bool = True) -> dict[str, dict]:
    """Score every task; write records/<stage>/<task>.jsonl; return {task: {score, n, cached}}.

    With cache_dir and fingerprint (base evaluation), a result is reused when the model weights and the
    task's signature are unchanged."""
    out: dict[str, dict] = {}
    bar = Bar(len(tasks), f"eval {stage}", "{task.fields[name]}", enabled=progress, name="")
    with bar:
        for task in tasks:
            key = None
            cached = None
            if cache_dir is not None and fingerprint is not None:
                key = hashlib.sha256(json.dumps({"model": fingerprint, "task": task.signature()},
                                                sort_keys=True).encode()).hexdigest()[:24]
                path = cache_dir / f"{key}.json"
                if path.is_file():
                    try:
                        cached = json.loads(path.read_text())
                    except (OSError, json.JSONDecodeError):
                        cached = None  # a damaged entry is recomputed, not trusted
            if cached is not None:
                value, items = cached["score"], cached["items"]
            else:
                fn = score_generation if task.kind == "generation" else score_perplexity
                value, items = fn(model, tokenizer, task, batch_size)
                if key is not None:
                    cache_dir.mkdir(parents=True, exist_ok=True)
                    atomic_write_json(cache_dir / f"{key}.json", {"score": value, "items": items,
                                                                 "signature": task.signature()})
            write_jsonl(run_dir / "records" / stage / f"{task.name}.jsonl", items)
            out[task.name] = {"score": value, "n": len(items), "cached": cached is not None}
            bar.update(advance=1, name=task.name)
    return out
