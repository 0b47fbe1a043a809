"""Continual-learning bookkeeping: the accuracy matrix of a sequence of training stages (`continual_metrics`,
pure Python), and what a continual run keeps on disk between stages (the stage log and snapshots, below).

``R[i][j]`` is the score (points, higher is better) on stage j's target task after training stage i
(i, j = 0..T-1); an optional ``base[j]`` is the score before any training. From it:

- ``average_accuracy`` (OP_T in TRACE, ACC in GEM): mean_j R[T-1][j];
- ``bwt`` (backward transfer): mean over j < T-1 of R[T-1][j] − R[j][j] (negative: later stages undid
  earlier ones). GEM divides by T−1 (the tasks that have a "later"); ``bwt_trace`` uses TRACE's 1/T;
- ``forgetting[j]`` (Chaudhry et al.): max over i < T-1 of R[i][j] − R[T-1][j], for j < T-1; its mean;
- ``fwt`` (forward transfer, with base): mean over j > 0 of R[j-1][j] − base[j];
- ``learning[j]``: R[j][j] − base[j] (what stage j gained on its own task), with base.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from ftlab.utils.files import atomic_dir

__all__ = ["continual_metrics", "read_stage_log", "write_stage_log", "save_stage_snapshot",
           "load_stage_snapshot"]


def continual_metrics(R: Sequence[Sequence[float]], base: Optional[Sequence[float]] = None,
                      names: Optional[Sequence[str]] = None) -> dict:
    """Summary of an accuracy matrix R (T×T, row i = after stage i). See the module doc."""
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise ValueError(f"continual_metrics: R must be a non-empty square matrix, got {[len(r) for r in R]} rows")
    if base is not None and len(base) != T:
        raise ValueError(f"continual_metrics: base has {len(base)} entries for {T} stages")
    names = list(names) if names is not None else [str(j) for j in range(T)]
    last = R[T - 1]
    earlier = range(T - 1)
    forgetting = {names[j]: max(R[i][j] for i in range(T - 1)) - last[j] for j in earlier}
    out = {
        "R": [list(map(float, row)) for row in R],
        "stages": names,
        "average_accuracy": sum(last) / T,
        "bwt": sum(last[j] - R[j][j] for j in earlier) / (T - 1) if T > 1 else None,
        "bwt_trace": sum(last[j] - R[j][j] for j in earlier) / T,
        "forgetting": forgetting,
        "forgetting_mean": sum(forgetting.values()) / len(forgetting) if forgetting else None,
    }
    if base is not None:
        out["base"] = list(map(float, base))
        out["learning"] = {names[j]: R[j][j] - base[j] for j in range(T)}
        out["fwt"] = sum(R[j - 1][j] - base[j] for j in range(1, T)) / (T - 1) if T > 1 else None
    return out


# ------------------------------------------------------------------------------------- a run's stage record
# What a continual run keeps so that a resume can continue after the last finished stage (ftlab.pipeline):
# run_dir/stages.json lists the finished stages (their row of R and train stats); checkpoints/stage_<i>/ holds,
# after stage i, every weight any stage so far trained (HFT trains a different half in each stage, so the step
# checkpoints of stage i+1 do not hold what stage i changed), the method's state and the probes' base reference.
STAGE_LOG = "stages.json"


def read_stage_log(run_dir) -> list[dict]:
    """The finished stages of a continual run, in order ([] when none or unreadable)."""
    import json
    from pathlib import Path

    try:
        rows = json.loads((Path(run_dir) / STAGE_LOG).read_text())
    except (OSError, ValueError):
        return []
    return rows if isinstance(rows, list) and all(r.get("stage") == i for i, r in enumerate(rows)) else []


def write_stage_log(run_dir, rows: list[dict]) -> None:
    from pathlib import Path

    from ftlab.utils.files import atomic_write_json

    atomic_write_json(Path(run_dir) / STAGE_LOG, rows)


def snapshot_dir(run_dir, stage: int):
    from pathlib import Path

    return Path(run_dir) / "checkpoints" / f"stage_{stage:02d}"


def save_stage_snapshot(run_dir, stage: int, model, names, method, probes=None) -> None:
    """checkpoints/stage_<stage>/ (weights `names`, method and probe state; COMPLETE last, atomic rename); older
    stage snapshots are removed once it is in place."""
    import shutil

    import torch
    from safetensors.torch import save_file

    path = snapshot_dir(run_dir, stage)
    params = dict(model.named_parameters())
    with atomic_dir(path) as tmp:
        save_file({n: params[n].detach().to("cpu").contiguous().clone() for n in sorted(names)},
                  str(tmp / "weights.safetensors"))
        torch.save(method.state_dict(), tmp / "method.pt")
        torch.save(probes.state_dict() if probes is not None else {}, tmp / "probes.pt")
    for old in path.parent.glob("stage_*"):
        if old != path:
            shutil.rmtree(old, ignore_errors=True)


def load_stage_snapshot(run_dir, stage: int, model, method, probes=None) -> set[str] | None:
    """Restore checkpoints/stage_<stage>/ onto a freshly prepared model; the names of the weights it held, or
    None when there is no complete snapshot."""
    import torch
    from safetensors.torch import load_file

    path = snapshot_dir(run_dir, stage)
    if not (path / "COMPLETE").is_file():
        return None
    method.load_state_dict(torch.load(path / "method.pt", map_location="cpu", weights_only=True), model)
    weights = load_file(str(path / "weights.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"{path}: the snapshot has parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    if probes is not None:
        probes.load_state_dict(torch.load(path / "probes.pt", map_location="cpu", weights_only=True))
    return set(weights)


def train_stages(cfg, model, method, tok, tasks, resume, **kw) -> list[dict]:
    """Continual protocol: train cfg.stages in order (method.on_stage_start before each; a fresh optimizer and
    schedule per stage; one curve, steps continued), score every stage's target after each stage but the last
    (whose row is the tuned evaluation), records in records/stage_<i>/. Returns the stage log (stages.json).
    With data.replay_previous = f, stage i > 0 trains on its rows plus round(n * f / (1 - f)) rows of stages
    0..i-1 (`replay_rows`; n = its own task rows), shuffled in by the trainer; the log records `replayed_rows`.

    Resume: a finished stage is in stages.json and, when checkpoints are on (train.save_every > 0 or a SLURM
    job), in checkpoints/stage_<i>/; a restarted run restores the last one and continues with the next stage,
    from that stage's newest step checkpoint when it has one (exactly, as any run). Without a snapshot the run
    starts over from stage 0."""
    from ftlab.continual import (
        load_stage_snapshot,
        read_stage_log,
        save_stage_snapshot,
        write_stage_log,
    )
    from ftlab.data.sources import load_train, mix_count
    from ftlab.eval.evaluate import evaluate
    from ftlab.train import preempt
    from ftlab.train.batches import Batches, encode_example
    from ftlab.train.loop import LoopSettings, train

    names = [s.name for s in cfg.stages]
    stage_tasks = [t for t in tasks if t.role == "target" and t.name in names]
    snapshots = cfg.train.save_every > 0 or preempt.installed()
    log = read_stage_log(kw["run_dir"])
    trained: set[str] = set()  # every weight some stage so far trained (HFT: a different half per stage)
    if log:
        got = load_stage_snapshot(kw["run_dir"], len(log) - 1, model, method, kw.get("probes"))
        log, trained = ([], set()) if got is None else (log, got)
    k = len(log)
    if resume is not None and int(resume.state.get("stage", 0)) != k:
        resume = None  # a step checkpoint of a finished stage: the snapshot after it is newer
    # data.replay_previous: the finished stages' own rows, replayed beside a later stage's (a resume reloads them)
    replaying = any(s.replay_previous > 0 for s in cfg.stages[k:])
    earlier = [(s.name, task_rows(load_train(s, cfg.seed))) for s in cfg.stages[:k]] if replaying else []
    for i in range(k, len(cfg.stages)):
        method.on_stage_start(model, i)
        trained |= {n for n, p in model.named_parameters() if p.requires_grad}
        rows = load_train(cfg.stages[i], cfg.seed)
        own = task_rows(rows)
        replay = replay_rows(earlier, mix_count(len(own), cfg.stages[i].replay_previous), cfg.seed, i)
        rows = rows + replay
        earlier.append((names[i], own))
        encoded = [encode_example(tok, r["prompt"], r["response"], cfg.model.max_length) for r in rows]
        st = train(model, method, Batches(encoded, cfg.train.batch_size, cfg.seed), LoopSettings.of(cfg),
                   resume_from=resume if i == k else None, step_offset=i * cfg.train.max_steps, stage=i, **kw)
        scores = None
        if i < len(cfg.stages) - 1:
            ev = evaluate(model, tok, stage_tasks, cfg.eval.batch_size, stage=f"stage_{i}", run_dir=kw["run_dir"],
                          progress=kw["progress"])
            scores = {n: ev[n]["score"] for n in names}
        log.append({"stage": i, "name": names[i], "scores": scores, "train": dataclasses.asdict(st),
                    "replayed_rows": len(replay)})
        if snapshots:
            save_stage_snapshot(kw["run_dir"], i, model, trained, method, kw.get("probes"))
        write_stage_log(kw["run_dir"], log)  # after the snapshot: a stage is finished once both exist
    return log


def task_rows(rows: list[dict]) -> list[dict]:
    """A stage's own training rows: without the general rows data.mix adds (ids ``mix:``) or replayed ones."""
    return [r for r in rows if not str(r.get("id", "")).startswith(("mix:", "replay:"))]


def replay_rows(earlier: list[tuple[str, list[dict]]], n: int, seed: int, stage: int) -> list[dict]:
    """`n` rows of the earlier stages' training rows (classic experience replay), spread evenly over the stages in
    turn (stage 0 first gets the remainder), each stage's drawn without replacement while they last (a seeded order
    per stage and replaying stage), ids ``replay:<stage name>:<id>``."""
    import random

    from ftlab.data.sources import draw_passes

    if n <= 0 or not earlier:
        return []
    out = []
    for j, (name, rows) in enumerate(earlier):
        count = n // len(earlier) + (j < n % len(earlier))
        if not rows or not count:
            continue
        picks = draw_passes(len(rows), count, random.Random(f"replay:{seed}:{stage}:{j}"))
        out += [{**rows[p], "id": f"replay:{name}:{rows[p].get('id', p)}"} for p in picks]
    return out


def stage_totals(log: list[dict]):
    """One TrainResult for all stages: sums of steps, tokens and time, peaks of memory, the last stage's rest."""
    from ftlab.train.loop import TrainResult

    rows = [r["train"] for r in log]
    total = {**rows[-1], "steps": sum(r["steps"] for r in rows), "tokens": sum(r["tokens"] for r in rows),
             "wall_s": sum(r["wall_s"] for r in rows)}
    total["tokens_per_s"] = total["tokens"] / max(total["wall_s"], 1e-9)
    for k in ("peak_mem_bytes", "optimizer_state_bytes"):
        if k in total:
            total[k] = max(r.get(k) or 0 for r in rows)
    return TrainResult(**total)


def continual_section(cfg, log: list[dict], base: dict, tuned: dict, tasks) -> dict:
    """result.json `continual`: R[i][j] (stage j's target after stage i; the last row is the tuned evaluation),
    base scores, and ftlab.continual.continual_metrics of them."""
    from ftlab.continual import continual_metrics

    names = [s.name for s in cfg.stages]
    R = [[r["scores"][n] for n in names] for r in log[:-1]] + [[tuned[n]["score"] for n in names]]
    out = continual_metrics(R, base=[base[n]["score"] for n in names], names=names)
    by_name = {t.name: t for t in tasks}
    out["metric"] = {n: by_name[n].metric for n in names}
    out["unit"] = "points"
    # every entry's direction: accuracy-type R, so higher is better except forgetting (a drop)
    out["higher_is_better"] = {"R": True, "average_accuracy": True, "bwt": True, "bwt_trace": True,
                               "forgetting": False, "forgetting_mean": False, "fwt": True, "learning": True}
    out["records"] = [f"records/stage_{i}" for i in range(len(names) - 1)] + ["records/tuned"]  # row i's items
    return out
