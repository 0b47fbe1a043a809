"""The numbers of a comparison, as pure functions: seed folding with a t-interval, the Pareto front, forgetting
interpolated at a gain level along a trajectory, and the paired bootstrap over items and seeds. numpy only, no
torch, no I/O (docs/report.md says what each one means)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df (Abramowitz & Stegun 26.7.3/26.7.4: exact, no scipy)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd
        if df == 1:
            return 2 * theta / math.pi
        term, acc = math.cos(theta), math.cos(theta)
        for k in range(3, df - 1, 2):  # cos θ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + ...)
            term *= c2 * (k - 1) / k
            acc += term
        return 2 / math.pi * (theta + s * acc)
    term, acc = 1.0, 1.0
    for k in range(2, df - 1, 2):  # 1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ...
        term *= c2 * (k - 1) / k
        acc += term
    return s * acc


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """The two-sided critical value of Student's t: P(|T| < q) = confidence (df=2, 0.95 -> 4.303)."""
    if df < 1:
        raise ValueError(f"t_quantile: df must be >= 1, got {df}")
    lo, hi = 0.0, 1.0
    while _t_two_sided(hi, df) < confidence:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


def fold(values: Sequence[Optional[float]], confidence: float = 0.95) -> dict:
    """Mean, sample std (ddof 1), n and the t-interval of the mean over seeds. A None or non-finite value is not
    dropped silently: `missing` counts them and every statistic is None when any is missing, so a mean never
    hides a seed that has no number. n = 1: std and the interval are None (one seed has no spread)."""
    vals = list(values)
    bad = sum(v is None or not math.isfinite(v) for v in vals)
    out = {"mean": None, "std": None, "n": len(vals), "lo": None, "hi": None, "missing": bad}
    if bad or not vals:
        return out
    x = np.asarray(vals, dtype=float)
    out["mean"] = float(x.mean())
    if len(x) > 1:
        sd = float(x.std(ddof=1))
        half = t_quantile(len(x) - 1, confidence) * sd / math.sqrt(len(x))
        out.update(std=sd, lo=out["mean"] - half, hi=out["mean"] + half)
    return out


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Labels of the points (label, gain, forgetting) that no other point dominates: another point dominates when
    its gain is >= and its forgetting <=, one of them strictly. Points with a None coordinate are not on it."""
    ok = [(lab, g, f) for lab, g, f in points if g is not None and f is not None]
    return [lab for lab, g, f in ok
            if not any(g2 >= g and f2 <= f and (g2 > g or f2 < f) for _, g2, f2 in ok)]


def forgetting_at_gain(trajectory: Sequence[tuple[float, float]], level: float) -> Optional[float]:
    """Forgetting where a trajectory of (gain, forgetting) points, in training order, first reaches `level`.

    The rule (also for non-monotone curves): walk the points in order; at the first point whose gain is >= level,
    interpolate linearly between it and the point before (whose gain is < level); the point itself when it is the
    first one. Later dips below the level and re-crossings are ignored: the first crossing is the cheapest
    forgetting at which the run has shown that gain. None when no point reaches the level (never extrapolated)."""
    prev = None
    for g, f in trajectory:
        if g is None or f is None:
            continue
        if g >= level:
            if prev is None:
                return float(f)
            g0, f0 = prev
            w = (level - g0) / (g - g0)
            return float(f0 + w * (f - f0))
        prev = (g, f)
    return None


def _decompose(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(item means over seeds, seed effects rescaled to the seed variance component) of a seeds x items matrix.

    With x_si = mu + a_i + b_s + e_si, the item means carry a_i and e/S, and the raw seed effects (row mean minus
    grand mean) carry b_s plus e/I again; resampling both as they are counts the e term twice (the two-way
    bootstrap is conservative: Owen 2007). So the seed effects are shrunk to the estimated var(b) =
    var(row effects) - var(e)/I (two-way ANOVA residuals, floored at 0) and inflated by S/(S-1) for the
    plug-in bootstrap's small-S bias (rescaled-residual bootstrap of random effects: Carpenter, Goldstein and
    Rasbash 2003). One seed: no seed spread can be estimated and the seed part is 0."""
    S, n = x.shape
    cols = x.mean(axis=0)
    if S < 2:
        return cols, np.zeros(S)
    rows = x.mean(axis=1) - x.mean()
    resid = x - cols[None, :] - rows[:, None]
    var_e = float((resid ** 2).sum()) / ((S - 1) * max(n - 1, 1))
    var_r = float((rows ** 2).sum()) / (S - 1)
    var_b = max(0.0, var_r - var_e / n)
    scale = math.sqrt(var_b / var_r * S / (S - 1)) if var_r > 0 else 0.0
    return cols, rows * scale


def paired_bootstrap(a: Sequence[np.ndarray], b: Sequence[np.ndarray], n_boot: int = 2000,
                     rng: Optional[np.random.Generator] = None, confidence: float = 0.95) -> dict:
    """Difference mean(a) - mean(b) with a percentile bootstrap interval, paired on items.

    a, b: one array per task, each (seeds x items) of per-item values (e.g. tuned - base, points) with the SAME
    items in the same column order in a and b; the seeds of a and of b are separate runs. The statistic is the
    mean over tasks of (mean over seeds and items of a) - (same of b). Each resample draws the items of every task
    once, shared by a and b (the pairing: an item hard for both cancels), and the seeds of a and of b separately
    (a seed is one run: all its tasks come with it); items move the per-item means over seeds, seeds move the
    seed effects (see _decompose). Returns {diff, lo, hi, significant (interval excludes 0), items, seeds_a,
    seeds_b}."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_bootstrap: a and b need the same, non-zero number of tasks")
    rng = rng if rng is not None else np.random.default_rng(0)
    sa, sb = np.asarray(a[0]).shape[0], np.asarray(b[0]).shape[0]
    ia = rng.integers(0, sa, size=(n_boot, sa))
    ib = rng.integers(0, sb, size=(n_boot, sb))
    stats = np.zeros(n_boot)
    est = 0.0
    for xa, xb in zip(a, b):
        xa, xb = np.asarray(xa, dtype=float), np.asarray(xb, dtype=float)
        if xa.shape[1] != xb.shape[1] or xa.shape[0] != sa or xb.shape[0] != sb:
            raise ValueError(f"paired_bootstrap: shapes {xa.shape} and {xb.shape} do not pair")
        n = xa.shape[1]
        ca, ra = _decompose(xa)
        cb, rb = _decompose(xb)
        items = rng.integers(0, n, size=(n_boot, n))
        est += xa.mean() - xb.mean()
        stats += (ca - cb)[items].mean(axis=1) + ra[ia].mean(axis=1) - rb[ib].mean(axis=1)
    k = len(a)
    est, stats = est / k, stats / k
    alpha = (1 - confidence) / 2
    lo, hi = (float(v) for v in np.quantile(stats, [alpha, 1 - alpha]))
    return {"diff": float(est), "lo": lo, "hi": hi, "significant": bool(lo > 0 or hi < 0),
            "items": int(sum(np.asarray(x).shape[1] for x in a)), "seeds_a": int(sa), "seeds_b": int(sb)}
