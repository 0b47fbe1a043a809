"""Continual-learning bookkeeping: the accuracy matrix of a sequence of training stages. Pure Python.

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

__all__ = ["continual_metrics"]


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
