"""The report's figures, each returned as PNG bytes (matplotlib's Agg canvas, no pyplot: no global figure state,
no display, nothing imported until a plot is drawn, so `ftlab run` never loads matplotlib).

Input rules, the same for every function:
- malformed input (a missing key, a ragged matrix, a non-number where a number belongs, a Pareto label that names
  no point) raises ValueError naming the argument, the item and the fix;
- None is "not measured": a heatmap cell is left blank, a curve row is skipped, an error bar is not drawn;
- nothing left to draw (no points, every curve empty) gives a placeholder figure that says so, with the title, so
  a report with one missing kind of data still renders (a blank axis would read as a measured zero).
"""

from __future__ import annotations

import io
import math
from typing import Any, Optional, Sequence

_DPI = 110
_FADED = 0.28  # alpha of the unselected points (e.g. a method's other learning rates)


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # no Software/creation-date chunks: the same data gives the same bytes
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _placeholder(title: str, why: str) -> bytes:
    fig = _figure(5.0, 2.2)
    ax = fig.add_subplot()
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    ax.text(0.5, 0.5, f"no data to plot:\n{why}", ha="center", va="center", fontsize=11, color="0.35",
            transform=ax.transAxes)
    return _png(fig)


def _num(v: Any, what: str, *, none_ok: bool = False) -> float | None:
    """A finite float, or None where allowed; anything else is refused with `what` named."""
    if v is None:
        if none_ok:
            return None
        raise ValueError(f"{what} is None: give a number")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{what} = {v!r} is not a number")
    f = float(v)
    if not math.isfinite(f):
        if none_ok:  # a NaN in a heatmap or curve is a missing value, drawn as one
            return None
        raise ValueError(f"{what} = {v!r} is not finite: give a finite number")
    return f


def _colours(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _unique(xs) -> list:
    return list(dict.fromkeys(xs))


_CROWDED = 24  # points in gain_forgetting beyond which faded points go unnamed


def gain_forgetting(points: list[dict], pareto_labels: Sequence[str], title: str = "",
                    variant_curves: Optional[dict[str, list[tuple[float, float]]]] = None) -> bytes:
    """Gain (x) against forgetting (y, lower is better) with error bars; one colour per group, unselected points
    faded; the Pareto front (given by the caller, as labels) drawn as a step line through its points, ringed.

    points: [{label, gain, forgetting, gain_err, forgetting_err, selected, group}]; the errors may be None (no
    bar); `selected` defaults to True and `group` to the label. variant_curves: {group: [(gain, forgetting)]} in
    curve order (post-training variants), each drawn as a thin line with small markers in its group's colour."""
    if not points:
        return _placeholder(title, "no runs to place on gain vs forgetting")
    rows = []
    for i, p in enumerate(points):
        if not isinstance(p, dict) or "label" not in p:
            raise ValueError(f"gain_forgetting: points[{i}] needs a dict with a 'label' (got {p!r})")
        lab = str(p["label"])
        rows.append({"label": lab, "group": str(p.get("group") or lab), "selected": bool(p.get("selected", True)),
                     "gain": _num(p.get("gain"), f"gain_forgetting: point {lab!r} gain"),
                     "forgetting": _num(p.get("forgetting"), f"gain_forgetting: point {lab!r} forgetting"),
                     "gain_err": _num(p.get("gain_err"), f"gain_forgetting: point {lab!r} gain_err", none_ok=True),
                     "forgetting_err": _num(p.get("forgetting_err"), f"gain_forgetting: point {lab!r} forgetting_err",
                                            none_ok=True)})
    by_label = {r["label"]: r for r in rows}
    if len(by_label) < len(rows):
        dup = sorted({r["label"] for r in rows if sum(q["label"] == r["label"] for q in rows) > 1})
        raise ValueError(f"gain_forgetting: labels {dup} name more than one point: pareto_labels could not tell "
                         f"them apart (put the varied value, e.g. the lr, in the label)")
    unknown = [lab for lab in pareto_labels if lab not in by_label]
    if unknown:
        raise ValueError(f"gain_forgetting: pareto_labels {unknown} name no point (labels: {sorted(by_label)})")

    vxy = _xy_lines(variant_curves or {}, "gain_forgetting: variant_curves")
    groups = _unique(r["group"] for r in rows)
    # a sweep of many groups x learning rates (the 17-method comparison: 68 points) buries every point under its
    # label: past CROWDED points only the selected ones are named, and the legend moves beside the axes
    crowded = len(rows) > _CROWDED
    fig = _figure(9.5 if crowded else 7.0, 6.0 if crowded else 5.0)
    ax = fig.add_subplot()
    colour = _colours(groups + [g for g in vxy if g not in groups])
    for g, (xs, ys) in vxy.items():
        ax.plot(xs, ys, marker=".", markersize=4, linewidth=0.8, color=colour[g], alpha=0.8, zorder=1)
    if vxy:
        ax.plot([], [], marker=".", linewidth=0.8, color="0.4", label="post-training variants")
    for g in groups:
        for sel in (False, True):
            rs = [r for r in rows if r["group"] == g and r["selected"] is sel]
            if not rs:
                continue
            xerr = [r["gain_err"] or 0.0 for r in rs] if any(r["gain_err"] is not None for r in rs) else None
            yerr = ([r["forgetting_err"] or 0.0 for r in rs]
                    if any(r["forgetting_err"] is not None for r in rs) else None)
            ax.errorbar([r["gain"] for r in rs], [r["forgetting"] for r in rs], xerr=xerr, yerr=yerr, fmt="o",
                        color=colour[g], alpha=1.0 if sel else _FADED, markersize=7 if sel else 5, capsize=3,
                        elinewidth=1, label=g if sel or not any(r["selected"] for r in rows if r["group"] == g)
                        else None, zorder=3 if sel else 2)
            for r in rs:  # the faded ones named too (which learning rate lost is part of the result), unless crowded
                if crowded and not sel:
                    continue
                ax.annotate(r["label"], (r["gain"], r["forgetting"]), textcoords="offset points", xytext=(5, 5),
                            fontsize=7 if crowded else (8 if sel else 7), color="0.2", alpha=1.0 if sel else 0.55)
    front = sorted((by_label[lab] for lab in _unique(pareto_labels)), key=lambda r: r["gain"])
    if front:
        # "pre": between two front points the forgetting paid is the one of the larger gain
        ax.step([r["gain"] for r in front], [r["forgetting"] for r in front], where="pre", color="0.25",
                linestyle="--", linewidth=1.2, label="Pareto front", zorder=1)
        ax.scatter([r["gain"] for r in front], [r["forgetting"] for r in front], s=170, facecolors="none",
                   edgecolors="0.1", linewidths=1.4, zorder=4)
    if any(not r["selected"] for r in rows):
        ax.scatter([], [], color="0.5", alpha=_FADED, label="not selected (faded)")
    ax.axhline(0.0, color="0.8", linewidth=0.8, zorder=0)
    ax.set_xlabel("gain on target (points, higher is better)")
    ax.set_ylabel("forgetting (points, lower is better)")
    ax.grid(True, alpha=0.3)
    if crowded:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # constrained layout makes room
    else:
        ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title)
    return _png(fig)


def _matrix(values: Sequence[Sequence[Any]], n_rows: int, n_cols: int, what: str):
    import numpy as np

    if len(values) != n_rows:
        raise ValueError(f"{what}: {len(values)} rows of values for {n_rows} row labels")
    m = np.full((n_rows, n_cols), np.nan)
    for i, row in enumerate(values):
        if len(row) != n_cols:
            raise ValueError(f"{what}: row {i} has {len(row)} values for {n_cols} columns")
        for j, v in enumerate(row):
            f = _num(v, f"{what}: value [{i}][{j}]", none_ok=True)
            if f is not None:
                m[i, j] = f
    return np.ma.masked_invalid(m)


def _annotated_heatmap(ax, m, norm, cmap, fmt: str) -> Any:
    cm = cmap.with_extremes(bad="white")  # None: blank, not a colour that reads as a value
    im = ax.imshow(m, cmap=cm, norm=norm, aspect="auto")
    for (i, j), v in _cells(m):
        r, g, b, _ = cm(norm(v))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    return im


def _cells(m):
    import numpy as np

    mask = np.ma.getmaskarray(m)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not mask[i, j]:
                yield (i, j), float(m[i, j])


def _heatmap_size(n_rows: int, n_cols: int) -> tuple[float, float]:
    return max(4.5, 1.6 + 0.85 * n_cols), max(2.2, 1.2 + 0.42 * n_rows)


def task_heatmap(rows: Sequence[str], cols: Sequence[str], values: Sequence[Sequence[float | None]], title: str = "",
                 center: float = 0.0) -> bytes:
    """Per-task deltas (points), groups x tasks, on a diverging colormap centred at `center` (red below, blue
    above), each cell annotated; None is left blank."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    if not rows or not cols:
        return _placeholder(title, "no groups or no tasks for the per-task table")
    centre = _num(center, "task_heatmap: center")
    m = _matrix(values, len(rows), len(cols), "task_heatmap")
    if m.count() == 0:
        return _placeholder(title, "every per-task value is missing")
    # symmetric about the centre, so equal colours mean equal distances either side
    half = float(abs(m - centre).max()) or 1.0
    norm = Normalize(vmin=centre - half, vmax=centre + half)
    fig = _figure(*_heatmap_size(len(rows), len(cols)))
    ax = fig.add_subplot()
    im = _annotated_heatmap(ax, m, norm, colormaps["RdBu"], "+.1f")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=8)
    fig.colorbar(im, ax=ax, label="delta (points)", shrink=0.85)
    if title:
        ax.set_title(title)
    return _png(fig)


def _xy_lines(curves: dict, what: str) -> dict[str, tuple[list[float], list[float]]]:
    out = {}
    for label, pts in curves.items():
        xs, ys = [], []
        for k, pt in enumerate(pts):
            if not isinstance(pt, (tuple, list)) or len(pt) != 2:
                raise ValueError(f"{what}: {label!r}[{k}] = {pt!r}: give pairs (x, y)")
            x = _num(pt[0], f"{what}: {label!r}[{k}] x", none_ok=True)
            y = _num(pt[1], f"{what}: {label!r}[{k}] y", none_ok=True)
            if x is not None and y is not None:
                xs.append(x)
                ys.append(y)
        if xs:
            out[str(label)] = (xs, ys)
    return out


def _lines_figure(lines: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str,
                  sort_x: bool):
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    colour = _colours(list(lines))
    for label, (xs, ys) in lines.items():
        if sort_x:
            order = sorted(range(len(xs)), key=xs.__getitem__)
            xs, ys = [xs[i] for i in order], [ys[i] for i in order]
        ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, markersize=3.5, linewidth=1.4, color=colour[label],
                label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title)
    return fig, ax


def training_curves(curves: dict[str, list[dict]], key: str = "loss", title: str = "") -> bytes:
    """`key` against step, one line per label (metrics.jsonl rows); rows without `key` (or with it None, as the
    step-0 probe row's loss) are skipped, so a probe key plots only where it was measured."""
    lines = {}
    for label, rs in curves.items():
        pts = []
        for k, r in enumerate(rs):
            if not isinstance(r, dict) or "step" not in r:
                raise ValueError(f"training_curves: {label!r}[{k}] = {r!r}: each row needs a 'step'")
            if r.get(key) is not None:
                pts.append((r["step"], r[key]))
        lines[label] = pts
    xy = _xy_lines(lines, "training_curves")
    if not xy:
        return _placeholder(title, f"no row has {key!r}")
    fig, _ = _lines_figure(xy, "step", key, title, sort_x=True)
    return _png(fig)


def matched_gain(curves: dict[str, list[tuple[float, float]]], levels: Sequence[float], title: str = "") -> bytes:
    """Forgetting against gain along each group's trajectory (points in trajectory order, not sorted: a
    trajectory can fold back), with the matched gain levels as vertical dashed lines."""
    xy = _xy_lines(curves, "matched_gain")
    if not xy:
        return _placeholder(title, "no group has a gain/forgetting trajectory")
    fig, ax = _lines_figure(xy, "gain on target (points)", "forgetting (points, lower is better)", title,
                            sort_x=False)
    for i, lv in enumerate(levels):
        ax.axvline(_num(lv, f"matched_gain: levels[{i}]"), color="0.4", linestyle="--", linewidth=1,
                   label="matched gain levels" if i == 0 else None)
    if levels:
        ax.legend(fontsize=8, loc="best")
    return _png(fig)


def r_matrix(R: Sequence[Sequence[float | None]], names: Sequence[str], title: str = "") -> bytes:
    """The continual accuracy matrix: row i after stage i, column j task j, annotated; None blank."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    if not R or not names:
        return _placeholder(title, "no continual stages")
    m = _matrix(R, len(R), len(names), "r_matrix")
    if m.count() == 0:
        return _placeholder(title, "every R value is missing")
    lo, hi = float(m.min()), float(m.max())
    norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)
    fig = _figure(*_heatmap_size(len(R), len(names)))
    ax = fig.add_subplot()
    im = _annotated_heatmap(ax, m, norm, colormaps["viridis"], ".1f")
    ax.set_xticks(range(len(names)), [str(n) for n in names], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(R)), [f"after {names[i]}" if len(R) == len(names) else f"after stage {i}"
                                  for i in range(len(R))], fontsize=8)
    ax.set_xlabel("task")
    fig.colorbar(im, ax=ax, label="score", shrink=0.85)
    if title:
        ax.set_title(title)
    return _png(fig)


def update_profile(profiles: dict[str, list[tuple[int, float]]], title: str = "",
                   ylabel: str = "relative update ||dW|| / ||W||") -> bytes:
    """A per-layer quantity (by default diagnostics' mean relative update), one line per label."""
    for label, pts in profiles.items():
        for k, pt in enumerate(pts):
            layer = pt[0] if isinstance(pt, (tuple, list)) and pt else None
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ValueError(f"update_profile: {label!r}[{k}] = {pt!r}: the layer index must be an int "
                                 f"(leave out parameters outside the decoder layers)")
    xy = _xy_lines(profiles, "update_profile")
    if not xy:
        return _placeholder(title, "no per-layer values")
    fig, ax = _lines_figure(xy, "layer", ylabel, title, sort_x=True)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)
