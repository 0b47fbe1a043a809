"""The sections of an `ftlab report`: the cell formats (mean ± std, intervals), the tables built from the compared
groups (forgetting by distance, matched gain, variants, paired differences' cells) and the figures attached to them.
ftlab.report.render assembles them into the report and writes its files."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ftlab.report import compare as C


def num(x: Optional[float], nd: int = 1) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def mean_std(fd: Optional[dict], nd: int = 1) -> str:
    """mean ± std over seeds; "missing k" when a seed has no number."""
    if not fd:
        return "—"
    if fd.get("missing"):
        return f"missing in {fd['missing']}/{fd['n']} seeds"
    if fd["mean"] is None:
        return "—"
    return f"{fd['mean']:.{nd}f}" + (f" ± {fd['std']:.{nd}f}" if fd["std"] is not None else "")


def task_head(name: str, t: dict) -> str:
    bits = [t.get("role") or "?"]
    if t.get("unit", "points") != "points":
        bits.append(t["unit"])
    if t.get("chance") is not None:
        bits.append(f"chance {t['chance']:g}")
    return f"{name} ({', '.join(bits)})"


def interval(fd: Optional[dict]) -> str:
    return f"[{fd['lo']:.1f}, {fd['hi']:.1f}]" if fd and fd.get("lo") is not None else "—"


@dataclass
class Section:
    heading: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    text: str = ""  # a paragraph above the table (markdown-safe plain text)
    images: list[tuple[str, bytes]] = field(default_factory=list)


def distance_section(compared) -> Optional[Section]:
    """Forgetting by distance to the target (world runs' forgetting_near/far), or None when no group has it."""
    if not any(g.stats.get("distance") for g in compared):
        return None
    sec = Section("Forgetting by distance to the target (points; mean ± std over seeds, 95% t-interval)",
                  ["group", "seeds", "near", "near 95% CI", "far", "far 95% CI", "near - far", "near - far 95% CI"])
    for g in compared:
        d = g.stats.get("distance")
        if not d:
            sec.rows.append([g.label, len(g.runs), "not recorded", "—", "not recorded", "—", "—", "—"])
            continue
        n, f, x = d["forgetting_near"], d["forgetting_far"], d["near_minus_far"]
        if d["no_near"]:
            sec.rows.append([g.label, len(g.runs), "no close skill", "—", mean_std(f), interval(f), "—", "—"])
            continue
        sec.rows.append([g.label, len(g.runs), mean_std(n), interval(n), mean_std(f), interval(f), mean_std(x), interval(x)])
    sec.text = ("near: mean drop over the pretraining skills structurally close to the target; far: over the others "
                "(result.json summary forgetting_near / forgetting_far; > 0 is worse). near - far is taken within "
                "each run, then folded over seeds: an interval above 0 says the close skills are forgotten more. "
                "'not recorded': no run of the group has the keys (not a world run, or written before them); "
                "'no close skill': a target no pretraining skill is close to (far is then every skill).")
    return sec


def pair_cells(d: Optional[dict]) -> list[str]:
    if not d:
        return ["no paired records", "—"]
    return [f"{d['diff']:+.1f}{' *' if d['significant'] else ''}", f"[{d['lo']:+.1f}, {d['hi']:+.1f}]"]


def items_cell(p: dict) -> str:
    return " / ".join(f"{m} {p[m]['items'] if p[m] else 0}" for m in ("gain", "forgetting"))


def seeds_cell(p: dict) -> str:
    d = p["gain"] or p["forgetting"]
    return f"{d['seeds_a']}/{d['seeds_b']}" if d else "—"


ALONG = {"interp": "along interpolation toward the base (post=interp variants",
          "lines": "along LiNeS scaling (post=lines variants"}


def matched_section(mg: dict, kind: Optional[str] = None) -> Section:
    lv = mg["levels"]
    head = (f"Forgetting at matched gain {ALONG[kind]}" if kind
            else "Forgetting at matched gain along training (from curve.jsonl")
    sec = Section(f"{head}; mean ± std over seeds, rank)", ["group"] + [f"gain {x:g}" for x in lv])
    for i, row in enumerate(mg["rows"]):
        cells = []
        for j, c in enumerate(row["cells"]):
            if c["fold"] is None:
                cells.append(f"not reached ({c['reached']}/{c['n']} seeds)")
            else:
                cells.append(f"{mean_std(c['fold'])} (#{mg['ranks'][j][row['label']]})")
        sec.rows.append([row["label"]] + cells)
    notes = ["Each run's forgetting where its curve first reaches the level, linearly interpolated between the two "
             "curve points around the crossing; never extrapolated."]
    if kind == "interp":
        notes.append("The curve runs over alpha in increasing order: alpha 0 = the base (gain 0, forgetting 0), "
                     "alpha 1 = the tuned run; the levels are those of the along-training table when it has any.")
    elif kind == "lines":
        notes.append("The curve runs over the LiNeS variants in increasing alpha (then beta); the evaluated points "
                     "only.")
    if not lv:
        notes.append("No common gain level: not every compared run has a curve that rises above 0 "
                     + ("(give --levels)." if kind else "(train with eval.curve_every=N, or give --levels)."))
    if mg["no_curves"]:
        what = f"{kind} variants" if kind else "curve.jsonl"
        notes.append(f"Without {what} (not ranked): {', '.join(mg['no_curves'])}.")
    sec.text = " ".join(notes)
    return sec


def params_cell(p: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in p.items())


def variants_section(compared) -> Optional[Section]:
    sec = Section("Post-training variants (result.json variants; mean ± std over seeds)",
                  ["group", "variant", "kind", "params", "seeds", "gain", "forgetting"])
    for g in compared:
        for v in C.variants_table(g):
            sec.rows.append([g.label, v["name"], v["kind"], params_cell(v["params"]), v["gain"]["n"] - v["gain"]["missing"],
                             mean_std(v["gain"]), mean_std(v["forgetting"])])
    if not sec.rows:
        return None
    sec.text = ("Each variant evaluated on the run's test tasks (records/variant_<name>/); seeds = how many of the "
                "group's seeds have it, and a mean is shown only when all do.")
    return sec


def plot(name: str, *args, **kw) -> Optional[bytes]:
    from ftlab.report import plots

    return getattr(plots, name)(*args, **kw)


def variant_lines(g) -> Optional[list[tuple[float, float]]]:
    """The group's interp (else LiNeS) variants as mean (gain, forgetting) over seeds in increasing alpha, with
    the base and the tuned mean at alpha 0 and 1 for interp, as variant_trajectory anchors them."""
    for kind in C.VARIANT_KINDS:
        rows = [v for v in C.variants_table(g) if v["kind"] == kind and v["alpha"] is not None
                and v["gain"]["mean"] is not None and v["forgetting"]["mean"] is not None]
        if kind == "interp":
            rows = [v for v in rows if v["alpha"] >= 0]
        if not rows:
            continue
        pts = {v["alpha"]: (v["gain"]["mean"], v["forgetting"]["mean"]) for v in rows}
        if kind == "interp":
            pts.setdefault(0.0, (0.0, 0.0))
            if g.stats["gain"]["mean"] is not None and g.stats["forgetting"]["mean"] is not None:
                pts.setdefault(1.0, (g.stats["gain"]["mean"], g.stats["forgetting"]["mean"]))
        return [pts[a] for a in sorted(pts)]
    return None


def add_images(sections: list[Section], groups, compared, pareto, task_names, mg, mg_post=None) -> None:
    pts = [{"label": g.label, "gain": g.stats["gain"]["mean"], "forgetting": g.stats["forgetting"]["mean"],
            "gain_err": half_width(g.stats["gain"]), "forgetting_err": half_width(g.stats["forgetting"]),
            "selected": g.selected, "group": g.label.split(" [")[0]} for g in groups
           if g.stats["gain"]["mean"] is not None and g.stats["forgetting"]["mean"] is not None]
    vcurves = {g.label.split(" [")[0]: c for g in compared if (c := variant_lines(g))}
    sections[1].images.append(("Gain vs forgetting (error bars: 95% t-interval; Pareto front marked"
                               + ("; thin lines: post-training variants, mean over seeds" if vcurves else "") + ")",
                               plot("gain_forgetting", pts, pareto, title="gain vs forgetting",
                                     variant_curves=vcurves or None)))
    points_tasks = [n for n in task_names if compared[0].stats["tasks"].get(n, {}).get("unit", "points") == "points"]
    vals = [[(g.stats["tasks"].get(n) or {}).get("improvement", {}).get("mean") for n in points_tasks]
            for g in compared]
    sections[index_of(sections, "Per task")].images.append(
        ("Per-task change (points; red = worse)", plot("task_heatmap", [g.label for g in compared], points_tasks,
                                                         vals, title="per-task change")))
    along = {f"{lab} ({kind})": c for kind, m in (mg_post or {}).items() for lab, c in m["curves"].items() if c}
    if mg["curves"] or along:
        sections[index_of(sections, "Forgetting at matched gain")].images.append(
            ("Forgetting vs gain along training" + (" and along the variants" if along else "")
             + " (first seed of each group)",
             plot("matched_gain", {**mg["curves"], **along}, mg["levels"] or next(
                 (m["levels"] for m in (mg_post or {}).values() if m["levels"]), []), title="forgetting vs gain")))
    curves = {g.label: [r for r in (g.runs[0].train_curve() or []) if r.get("loss") is not None] for g in compared}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        imgs = [("Training loss (first seed)", plot("training_curves", curves, key="loss", title="training loss"))]
        probes = {k: [r for r in v if r.get("probe_ppl") is not None] for k, v in curves.items()}
        if any(probes.values()):
            imgs.append(("In-training probe perplexity (first seed)",
                         plot("training_curves", {k: v for k, v in probes.items() if v}, key="probe_ppl",
                               title="probe perplexity")))
        sections.append(Section("Training curves", images=imgs))
    profiles = {g.label: p for g in compared if (p := C.update_profile(g))}
    if profiles:
        sections.append(Section("Update profile (diagnostics: mean ||dW||/||W|| per layer)",
                                images=[("Relative update per layer", plot("update_profile", profiles,
                                                                           title="update profile"))]))


def index_of(sections: list[Section], prefix: str) -> int:
    return next(i for i, s in enumerate(sections) if s.heading.startswith(prefix))


def half_width(fd: dict) -> Optional[float]:
    return (fd["hi"] - fd["mean"]) if fd.get("hi") is not None else None
