"""What a comparison computes from grouped runs: per-group summaries folded over seeds, chance-aware retention,
per-task deltas, selection on validation, the fairness check, forgetting at matched gain, paired bootstrap
differences from per-item records, continual R matrices and update profiles. Pure data in, data out (the files
are read through ftlab.report.runs.Run); rendering is in ftlab.report.render."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ftlab.eval.metrics import above_chance_retention, improvement
from ftlab.report.runs import ReportError, Run, finite, group_key, group_runs, label_groups
from ftlab.report.stats import fold, forgetting_at_gain, paired_bootstrap, pareto_front

SUMMARY_KEYS = ("gain", "forgetting", "forgetting_max", "retention")
# world runs' summary: mean drop over the pretraining skills structurally close to the target, and over the rest
DISTANCE_KEYS = ("forgetting_near", "forgetting_far")


@dataclass
class Group:
    label: str
    runs: list[Run]
    selected: bool = True          # False: a --select candidate that lost (kept for the plot)
    chosen: Optional[str] = None   # "train.lr=0.001": the selected value
    stats: dict = field(default_factory=dict)

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]


def _points(t: dict) -> bool:
    return t.get("unit", "points") == "points"


def retention_above_chance(tasks: dict) -> Optional[float]:
    """Mean over forget tasks in points that record `chance` (with base above it) of 100 x (tuned - chance) /
    (base - chance): the share of the above-chance ability left (a drop from 60 to 52 at chance 50 is 20%).
    None when no task records its chance level."""
    vals = [above_chance_retention(t["base"], t["tuned"], t["chance"]) for t in tasks.values()
            if t.get("role") == "forget" and _points(t) and t.get("higher_is_better", True)
            and finite(t.get("chance")) is not None]
    vals = [v for v in vals if v is not None]  # a base at or below chance has nothing to keep
    return sum(vals) / len(vals) if vals else None


def task_improvement(t: dict) -> Optional[float]:
    """Per-task change, positive = better (tuned - base for accuracy, base - tuned for perplexity)."""
    if finite(t.get("base")) is None or finite(t.get("tuned")) is None:
        return None
    return improvement(t["base"], t["tuned"], t.get("higher_is_better", True))


def summarize_group(runs: list[Run], split: str = "test") -> dict:
    """Seed folds of the summary numbers, chance-aware retention, and every task's improvement."""
    out: dict[str, Any] = {}
    for k in SUMMARY_KEYS:
        out[k] = fold([finite(r.summary(split).get(k)) for r in runs])
    out["distance"] = distance(runs, split)
    rac = [retention_above_chance(r.tasks(split)) for r in runs]
    out["retention_above_chance"] = fold(rac) if any(v is not None for v in rac) else None
    names: dict[str, dict] = {}
    for r in runs:
        for name, t in r.tasks(split).items():
            names.setdefault(name, t)
    out["tasks"] = {}
    for name, t0 in names.items():
        f = fold([task_improvement(r.tasks(split)[name]) if name in r.tasks(split) else None for r in runs])
        out["tasks"][name] = {"role": t0.get("role"), "unit": t0.get("unit", "points"), "chance": t0.get("chance"),
                              "improvement": f,
                              "base": fold([finite((r.tasks(split).get(name) or {}).get("base")) for r in runs]),
                              "tuned": fold([finite((r.tasks(split).get(name) or {}).get("tuned")) for r in runs])}
    return out


def distance(runs: list[Run], split: str = "test") -> Optional[dict]:
    """Forgetting by distance to the target: forgetting_near, forgetting_far and near - far, each folded over
    seeds (stats.fold, as forgetting). near - far is differenced within each run first (the near and far skills
    of one run share its seed, its target and its training), then folded, so its interval is that of the paired
    difference, not one built from the two means' intervals. None when no run of the group records either key
    (non-world runs, runs written before the keys); a run that lacks one among runs that have it makes the fold
    "missing", never a mean over the others. no_near: every run has far and none has near, a target with no
    pretraining skill close to it (world.skills.NEIGHBOURS), as opposed to a number that is missing."""
    near = [finite(r.summary(split).get("forgetting_near")) for r in runs]
    far = [finite(r.summary(split).get("forgetting_far")) for r in runs]
    if not any(k in r.summary(split) and r.summary(split)[k] is not None for r in runs for k in DISTANCE_KEYS):
        return None
    diff = [n - f if n is not None and f is not None else None for n, f in zip(near, far)]
    return {"forgetting_near": fold(near), "forgetting_far": fold(far), "near_minus_far": fold(diff),
            "no_near": all(n is None for n in near) and all(f is not None for f in far)}


def make_groups(runs: list[Run], over: tuple[str, ...] = ()) -> list[Group]:
    groups = group_runs(runs, over)
    labels = label_groups(groups, over)
    out = [Group(label=lab, runs=g) for lab, g in zip(labels, groups)]
    for g in out:
        g.stats = summarize_group(g.runs)
    return sorted(out, key=lambda g: g.label)


def select(runs: list[Run], key: str, over: tuple[str, ...] = ()) -> list[Group]:
    """--select KEY: group without KEY (and the --over keys); within each such family, the KEY value whose runs
    have the best mean VALIDATION gain (ties: lower mean validation forgetting) is selected. Only result.json's
    `validation` section is read to choose; the test numbers of every candidate are summarised afterwards, for
    the report, and never compared. Returns every candidate, the winners with selected=True."""
    missing = [r for r in runs if finite(r.summary("validation").get("gain")) is None]
    if missing:
        raise ReportError(f"--select {key}: {len(missing)} completed run(s) have no validation scores "
                          f"(result.json `validation`), e.g. {missing[0].path}; rerun them with eval.validation=true")
    cells = group_runs(runs, over)  # candidates: config minus seed (KEY kept)
    families: dict[tuple, list[list[Run]]] = {}
    for cell in cells:
        families.setdefault(group_key(cell[0], over + (key,)), []).append(cell)
    fam_groups = [[r for c in cells for r in c] for cells in families.values()]
    fam_labels = label_groups(fam_groups, over + (key,)) if len(fam_groups) > 1 else \
        [str(fam_groups[0][0].flat.get("method.name", "all"))]
    out = []
    for lab, cands in zip(fam_labels, families.values()):
        def score(cell: list[Run]) -> tuple:
            g = [finite(r.summary("validation").get("gain")) for r in cell]
            f = [finite(r.summary("validation").get("forgetting")) for r in cell]
            fm = sum(f) / len(f) if all(x is not None for x in f) else float("inf")
            return (-round(sum(g) / len(g), 9), round(fm, 9))

        best = min(range(len(cands)), key=lambda i: score(cands[i]))
        for i, cell in enumerate(cands):
            value = _value(cell[0], key)
            grp = Group(label=f"{lab} [{key}={value}]" if i != best else lab, runs=cell, selected=i == best,
                        chosen=f"{key}={value}")
            grp.stats = summarize_group(cell)
            grp.stats["validation"] = {k: fold([finite(r.summary("validation").get(k)) for r in cell])
                                       for k in ("gain", "forgetting")}
            out.append(grp)
    return sorted(out, key=lambda g: (not g.selected, g.label))


def _value(run: Run, key: str) -> str:
    vals = {k: v for k, v in run.flat.items() if k == key or k.startswith(key + ".")}
    if list(vals) == [key]:
        v = vals[key]
        return f"{v:g}" if isinstance(v, float) else str(v)
    return json.dumps(vals, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------------------ fairness
def _aspects(run: Run) -> dict[str, dict[str, str]]:
    """What must match between compared groups, per run: aspect -> {key: value}."""
    f = run.flat

    def pick(prefixes: tuple[str, ...], skip: tuple[str, ...] = ()) -> dict[str, str]:
        return {k: json.dumps(v, default=str) for k, v in f.items()  # null = absent, as in runs.group_key
                if v is not None and k.startswith(prefixes) and not k.startswith(skip)}

    tasks = run.tasks()
    items = {}
    for name, t in tasks.items():
        rows = run.records("base", name) or run.records("tuned", name)
        if rows is None:
            items[f"items of {name}"] = "no records"
            continue
        ids = sorted(str(r.get("id")) for r in rows)
        items[f"items of {name}"] = f"{len(ids)} ids {hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:8]}"
    steps, bs, ga = (f.get(k) for k in ("train.max_steps", "train.batch_size", "train.grad_accum"))
    budget = steps * bs * (ga or 1) if all(isinstance(x, int) for x in (steps, bs)) else None
    return {
        "base model": pick(("model.",), ("model.prompt_format",)),
        "target data": pick(("data.", "stages.")),
        # (curves and validation scores are extra measurements: the test numbers are the same with or without)
        "evaluation suite": {**pick(("eval.",), ("eval.batch_size", "eval.cache_base", "eval.diagnostics",
                                                 "eval.probe_", "eval.curve_", "eval.validation")),
                             "tasks": json.dumps(sorted((n, t.get("role"), t.get("metric")) for n, t in tasks.items()))},
        "item sets": items,
        "prompt format": {"model.prompt_format": json.dumps(f.get("model.prompt_format")),
                          **{f"{n} format/few_shot": json.dumps([t.get("format"), t.get("few_shot")])
                             for n, t in tasks.items()}},
        "step/token budget": {"train.max_steps x batch_size x grad_accum": json.dumps(budget)},
    }


def fairness(groups: list[Group]) -> list[str]:
    """One line per difference between the compared groups in what a fair comparison holds fixed."""
    if len(groups) < 2:
        return []
    per_group = []
    for g in groups:
        merged: dict[str, dict[str, set]] = {}
        for r in g.runs:
            for aspect, kv in _aspects(r).items():
                for k, v in kv.items():
                    merged.setdefault(aspect, {}).setdefault(k, set()).add(v)
        per_group.append(merged)
    lines = []
    aspects = list(_aspects(groups[0].runs[0]))
    for aspect in aspects:
        keys = sorted({k for m in per_group for k in m.get(aspect, {})})
        for k in keys:
            vals = ["|".join(sorted(m.get(aspect, {}).get(k, {"(absent)"}))) for m in per_group]
            if len(set(vals)) > 1:
                shown = "; ".join(f"{g.label}: {v}" for g, v in zip(groups, vals))
                lines.append(f"{aspect} differs — {k}: {shown}")
    return lines


# ------------------------------------------------------------------------------------------- matched gain
def trajectory(run: Run) -> Optional[list[tuple[float, float]]]:
    rows = run.curve()
    if not rows:
        return None
    rows = sorted(rows, key=lambda r: r.get("step", 0))
    return [(finite(r.get("gain")), finite(r.get("forgetting"))) for r in rows]


VARIANT_KINDS = ("interp", "lines")


def _alpha(v: dict) -> Optional[float]:
    return finite((v.get("params") or {}).get("alpha"))


def variant_trajectory(run: Run, kind: str) -> Optional[list[tuple[float, float]]]:
    """The run's `kind` variants (result.json `variants`) as (gain, forgetting) in increasing alpha, the curve
    from the base toward (and past) the tuned run. interp: alpha 0 is the base (gain 0, forgetting 0 by
    construction) and alpha 1 the tuned run (its summary), added where not evaluated, so a curve always starts at
    the base; negative alphas (away from the tuned run) are left out. lines: the evaluated points only (alpha 0
    with beta > 0 is not the base). None when the run has no variant of that kind."""
    vs = [v for v in run.result.get("variants") or [] if v.get("kind") == kind and _alpha(v) is not None]
    if not vs:
        return None
    pts = {}
    for v in vs:
        a = _alpha(v)
        if kind == "interp" and a < 0:
            continue
        key = (a, finite((v.get("params") or {}).get("beta")) or 0.0)
        pts[key] = (finite(v.get("gain")), finite(v.get("forgetting")))
    if kind == "interp":
        pts.setdefault((0.0, 0.0), (0.0, 0.0))
        s = run.summary()
        pts.setdefault((1.0, 0.0), (finite(s.get("gain")), finite(s.get("forgetting"))))
    return [pts[k] for k in sorted(pts)]


def default_levels(groups: list[Group], n: int = 4, traj=trajectory) -> list[float]:
    """n evenly spaced gain levels up to the highest gain EVERY compared run (each seed of each group) reaches
    along its curve; [] when that is not above 0."""
    tops = []
    for g in groups:
        for r in g.runs:
            tr = traj(r)
            gains = [x for x, _ in tr or [] if x is not None]
            if gains:
                tops.append(max(gains))
    top = min(tops) if tops else 0.0
    # not rounded: a level rounded up past the lowest top would be "not reached" by the run that defines it
    return [top * k / n for k in range(1, n + 1)] if top > 0 else []


def matched_gain(groups: list[Group], levels: Optional[list[float]] = None, traj=trajectory) -> dict:
    """Forgetting at common gain levels: each run's forgetting where its curve first reaches the level
    (stats.forgetting_at_gain), folded over seeds. A group where any seed never reaches a level is "not reached"
    there (k of n seeds said), with no mean; groups without a curve (curve.jsonl, or for `traj` =
    variant_trajectory the variants) are listed, not ranked."""
    with_curves = [g for g in groups if all(traj(r) for r in g.runs)]
    no_curves = [g.label for g in groups if g not in with_curves]
    lv = list(levels) if levels else default_levels(with_curves, traj=traj)
    rows = []
    for g in with_curves:
        cells = []
        for level in lv:
            per_seed = [forgetting_at_gain(traj(r), level) for r in g.runs]
            reached = sum(v is not None for v in per_seed)
            cells.append({"level": level, "reached": reached, "n": len(per_seed),
                          "fold": fold(per_seed) if reached == len(per_seed) else None})
        rows.append({"label": g.label, "cells": cells})
    ranks: list[dict[str, int]] = []
    for i in range(len(lv)):
        ok = sorted((r["cells"][i]["fold"]["mean"], r["label"]) for r in rows if r["cells"][i]["fold"])
        ranks.append({lab: k + 1 for k, (_, lab) in enumerate(ok)})
    curves = {g.label: [p for p in (traj(g.runs[0]) or []) if None not in p] for g in with_curves}
    return {"levels": lv, "rows": rows, "ranks": ranks, "no_curves": no_curves, "curves": curves}


def variants_table(g: Group) -> list[dict]:
    """One row per variant name any seed of the group evaluated: kind, params, and gain/forgetting folded over the
    group's seeds (stats.fold: a seed without that variant counts as missing, so no mean hides it)."""
    names: dict[str, dict] = {}
    for r in g.runs:
        for v in r.result.get("variants") or []:
            names.setdefault(str(v.get("name")), v)
    rows = []
    for name, v in names.items():
        per = [next((x for x in r.result.get("variants") or [] if str(x.get("name")) == name), None) for r in g.runs]
        rows.append({"name": name, "kind": v.get("kind"), "params": v.get("params") or {},
                     "alpha": _alpha(v),
                     "gain": fold([finite(x.get("gain")) if x else None for x in per]),
                     "forgetting": fold([finite(x.get("forgetting")) if x else None for x in per])})
    return sorted(rows, key=lambda x: (str(x["kind"]), x["alpha"] if x["alpha"] is not None else math.inf,
                                       sorted((x["params"] or {}).items())))


# ------------------------------------------------------------------------------------------ paired stats
def _item_matrix(runs: list[Run], task: str, split: str = "test") -> Optional[tuple[list[str], np.ndarray]]:
    """(item ids, seeds x items of improvement per item) of one task, or None when a run lacks scored records or
    the runs disagree on the items."""
    pre = "validation_" if split == "validation" else ""
    mats, ids0 = [], None
    for r in runs:
        t = r.tasks(split).get(task)
        base, tuned = r.records(pre + "base", task), r.records(pre + "tuned", task)
        if t is None or base is None or tuned is None:
            return None
        b = {str(x["id"]): x.get("score") for x in base}
        u = {str(x["id"]): x.get("score") for x in tuned}
        ids = sorted(b)
        if sorted(u) != ids or any(finite(b[i]) is None or finite(u[i]) is None for i in ids):
            return None
        if ids0 is not None and ids != ids0:
            return None
        ids0 = ids
        mats.append([improvement(b[i], u[i], t.get("higher_is_better", True)) for i in ids])
    return (ids0 or [], np.asarray(mats, dtype=float))


def paired(a: Group, b: Group, n_boot: int = 2000, seed: int = 0) -> dict:
    """Gain and forgetting differences a - b with paired bootstrap intervals (stats.paired_bootstrap), on the
    points tasks of each role that both groups scored on the same items. Forgetting is a drop (base - tuned), so
    a negative forgetting difference means a forgets less."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"a": a.label, "b": b.label}
    for role, metric, sign in (("target", "gain", 1.0), ("forget", "forgetting", -1.0)):
        names = [n for n, t in a.runs[0].tasks().items() if t.get("role") == role and _points(t)]
        xa, xb, skipped = [], [], []
        for n in names:
            ma, mb = _item_matrix(a.runs, n), _item_matrix(b.runs, n)
            if ma is None or mb is None or ma[0] != mb[0] or not ma[0]:
                skipped.append(n)
                continue
            xa.append(sign * ma[1])
            xb.append(sign * mb[1])
        out[metric] = paired_bootstrap(xa, xb, n_boot=n_boot, rng=rng) if xa else None
        out[f"{metric}_skipped"] = skipped  # tasks without matching per-item records
    return out


def references(groups: list[Group], baselines: list[str]) -> list[Group]:
    """The groups matching --baseline KEY=VALUE (a bare VALUE means method.name=VALUE)."""
    out = []
    for spec in baselines:
        key, _, value = spec.rpartition("=")
        key = key or "method.name"
        key = key if "." in key else f"{key}.name"
        out += [g for g in groups if g not in out and all(_value(r, key) == value for r in g.runs)]
    return out


# ----------------------------------------------------------------------------------- continual, profiles
def continual_table(g: Group) -> Optional[dict]:
    """R averaged over seeds (row i = after stage i, column j = stage j's target) and the folded metrics."""
    secs = [r.result.get("continual") for r in g.runs]
    if not all(isinstance(s, dict) and s.get("R") for s in secs):
        return None
    shapes = {(len(s["R"]), tuple(s.get("stages") or [])) for s in secs}
    if len(shapes) > 1:
        raise ReportError(f"group {g.label}: continual runs with different stages ({sorted(shapes)}); "
                          "compare runs of one stage list")
    T = len(secs[0]["R"])
    R = [[fold([finite(s["R"][i][j]) for s in secs])["mean"] for j in range(T)] for i in range(T)]
    metrics = {k: fold([finite(s.get(k)) for s in secs]) for k in ("average_accuracy", "bwt", "forgetting_mean", "fwt")}
    return {"R": R, "stages": list(secs[0].get("stages") or range(T)), "metrics": metrics}


def update_profile(g: Group) -> Optional[list[tuple[int, float]]]:
    """Mean over seeds of the relative update ||dW||/||W|| per decoder layer (diagnostics/weights.json)."""
    per_layer: dict[int, list[float]] = {}
    for r in g.runs:
        files = ((r.result.get("diagnostics") or {}).get("files") or {})
        p = r.path / files["weights"] if files.get("weights") else None
        if p is None or not p.is_file():
            return None
        by_layer = (json.loads(p.read_text()).get("summary") or {}).get("by_layer") or {}
        for layer, v in by_layer.items():
            if layer.isdigit() and finite(v.get("rel_update")) is not None:
                per_layer.setdefault(int(layer), []).append(v["rel_update"])
    n = len(g.runs)
    return [(k, sum(v) / n) for k, v in sorted(per_layer.items()) if len(v) == n] or None


def front(groups: list[Group]) -> list[str]:
    return pareto_front([(g.label, g.stats["gain"]["mean"], g.stats["forgetting"]["mean"]) for g in groups])
