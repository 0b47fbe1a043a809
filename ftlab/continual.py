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

from typing import Optional, Sequence

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
# What a continual run keeps so that a resume can continue after the last finished stage (ftlab.runner):
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

    from ftlab.record import atomic_write_json

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
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = dict(model.named_parameters())
    save_file({n: params[n].detach().to("cpu").contiguous().clone() for n in sorted(names)},
              str(tmp / "weights.safetensors"))
    torch.save(method.state_dict(), tmp / "method.pt")
    torch.save(probes.state_dict() if probes is not None else {}, tmp / "probes.pt")
    (tmp / "COMPLETE").write_text("ok\n")
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
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
