"""`ftlab report` end to end: discover, group (or select), check fairness, compute, and write the terminal table,
report.md, report.csv, report.html with its plots, and optionally a wandb run. docs/report.md documents it."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ftlab.report import compare as C
from ftlab.report.runs import ReportError, check_key, discover


@dataclass
class Options:
    paths: list[str]
    over: tuple[str, ...] = ()
    select: Optional[str] = None
    levels: Optional[list[float]] = None
    out: str = "report"
    strict: bool = False
    wandb: bool = False
    baselines: list[str] = field(default_factory=lambda: ["method=full", "method=lora"])
    n_boot: int = 2000


class Refused(ReportError):
    """--strict and the compared groups differ in what a fair comparison holds fixed."""


def _f(x: Optional[float], nd: int = 1) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def _ms(fd: Optional[dict], nd: int = 1) -> str:
    """mean ± std over seeds; "missing k" when a seed has no number."""
    if not fd:
        return "—"
    if fd.get("missing"):
        return f"missing in {fd['missing']}/{fd['n']} seeds"
    if fd["mean"] is None:
        return "—"
    return f"{fd['mean']:.{nd}f}" + (f" ± {fd['std']:.{nd}f}" if fd["std"] is not None else "")


def _task_head(name: str, t: dict) -> str:
    bits = [t.get("role") or "?"]
    if t.get("unit", "points") != "points":
        bits.append(t["unit"])
    if t.get("chance") is not None:
        bits.append(f"chance {t['chance']:g}")
    return f"{name} ({', '.join(bits)})"


def _ci(fd: Optional[dict]) -> str:
    return f"[{fd['lo']:.1f}, {fd['hi']:.1f}]" if fd and fd.get("lo") is not None else "—"


@dataclass
class Section:
    heading: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    text: str = ""  # a paragraph above the table (markdown-safe plain text)
    images: list[tuple[str, bytes]] = field(default_factory=list)


def build(opts: Options, log=print) -> dict:
    """Everything the report shows, as sections plus the raw groups (for tests and the CSV)."""
    found = discover(opts.paths)
    counts = ", ".join(f"{v} {k}" for k, v in found.counts.items())
    dup = f"; {len(found.duplicates)} duplicate run director{'y' if len(found.duplicates) == 1 else 'ies'} counted once" \
        if found.duplicates else ""
    log(f"runs: {counts}{dup} (only completed runs are compared)")
    runs = found.completed
    if not runs:
        raise ReportError(f"no completed runs under {' '.join(opts.paths)} ({counts}); point at run or sweep "
                          "directories whose result.json says completed")
    for k in opts.over:
        check_key(runs, k, "--over")
    if opts.select:
        check_key(runs, opts.select, "--select")
        groups = C.select(runs, opts.select, opts.over)
    else:
        groups = C.make_groups(runs, opts.over)
    compared = [g for g in groups if g.selected]
    unfair = C.fairness(compared)
    if unfair and opts.strict:
        raise Refused(f"--strict: the compared groups differ ({len(unfair)}): {unfair[0]}"
                      + (f" (and {len(unfair) - 1} more; run without --strict to list them)" if len(unfair) > 1 else ""))
    sections: list[Section] = []
    head = [f"Runs found: {counts}{dup}. Compared: {len(runs)} completed runs in {len(compared)} groups."]
    if opts.over:
        head.append(f"Folded over: {', '.join(opts.over)} (with seeds).")
    if opts.select:
        head.append(f"{opts.select} selected per group on the VALIDATION gain (ties: lower validation forgetting); "
                    "the numbers below are the TEST scores of the selected runs.")
    sections.append(Section("Fairness", ["difference"], [[x] for x in unfair],
                            " ".join(head) + (" The compared groups differ in what a fair comparison holds fixed:"
                                              if unfair else " The compared groups share base model, target data, "
                                              "evaluation suite, item sets, prompt format and step budget.")))
    pareto = C.front(compared)
    main = Section("Gain and forgetting (points; mean ± std over seeds, 95% t-interval)",
                   ["group", "seeds", "gain", "gain 95% CI", "forgetting", "forgetting 95% CI", "worst task drop",
                    "retention %", "retention above chance %", "Pareto"]
                   + (["selected", "validation gain"] if opts.select else []))
    for g in compared:
        s = g.stats
        main.rows.append([g.label, len(g.runs), _ms(s["gain"]), _ci(s["gain"]), _ms(s["forgetting"]),
                          _ci(s["forgetting"]), _ms(s["forgetting_max"]), _ms(s["retention"]),
                          _ms(s["retention_above_chance"]), "*" if g.label in pareto else ""]
                         + ([g.chosen, _ms(s["validation"]["gain"])] if opts.select else []))
    main.text = ("Forgetting is the mean drop over forget tasks (> 0 is worse); worst task drop is the largest one. "
                 "Retention above chance = (tuned - chance)/(base - chance) over tasks that record their chance level. "
                 "* = on the Pareto front of mean gain (max) and mean forgetting (min).")
    sections.append(main)
    dist = _distance_section(compared)
    if dist:
        sections.append(dist)
    if opts.select:
        cand = Section(f"Every {opts.select} candidate (selection reads validation only)",
                       ["group", opts.select, "selected", "validation gain", "validation forgetting", "test gain",
                        "test forgetting"])
        for g in groups:
            cand.rows.append([g.label, g.chosen.split("=", 1)[1], "yes" if g.selected else "",
                              _ms(g.stats["validation"]["gain"]), _ms(g.stats["validation"]["forgetting"]),
                              _ms(g.stats["gain"]), _ms(g.stats["forgetting"])])
        sections.append(cand)
    task_names = list(dict.fromkeys(n for g in compared for n in g.stats["tasks"]))
    tasks = Section("Per task: change tuned - base (mean ± std over seeds; positive = better, perplexity: base - tuned)",
                    ["group"] + [_task_head(n, next(g.stats["tasks"][n] for g in compared if n in g.stats["tasks"]))
                                 for n in task_names])
    for g in compared:
        tasks.rows.append([g.label] + [_ms(g.stats["tasks"][n]["improvement"],
                                           1 if g.stats["tasks"][n]["unit"] == "points" else 3)
                                       if n in g.stats["tasks"] else "—" for n in task_names])
    sections.append(tasks)
    mg = C.matched_gain(compared, opts.levels)
    sections.append(_matched_section(mg))
    # the same levels as along training where there are any, so the two tables' columns compare cell by cell
    mg_post = {}
    for kind in C.VARIANT_KINDS:
        if any(C.variant_trajectory(r, kind) for g in compared for r in g.runs):
            m = C.matched_gain(compared, opts.levels or mg["levels"] or None,
                               traj=lambda r, k=kind: C.variant_trajectory(r, k))
            mg_post[kind] = m
            sections.append(_matched_section(m, kind))
    vsec = _variants_section(compared)
    if vsec:
        sections.append(vsec)
    refs = C.references(compared, opts.baselines)
    pairs = Section("Paired differences vs the reference groups (bootstrap 95% over items and seeds)",
                    ["group", "vs", "Δ gain", "Δ gain 95%", "Δ forgetting", "Δ forgetting 95%", "items", "seeds"])
    pairs.text = ("Δ = group - reference; Δ forgetting < 0: the group forgets less. * = the interval excludes 0. "
                  "Items: per-item records summed over the tasks of each role; seeds: group/reference.")
    left_out: set[str] = set()
    done: set[tuple[int, int]] = set()
    for ref in refs:
        for g in compared:
            if g is ref or (id(ref), id(g)) in done:  # full vs lora shown once, not also lora vs full
                continue
            done.add((id(g), id(ref)))
            p = C.paired(g, ref, n_boot=opts.n_boot)
            pairs.rows.append([g.label, ref.label, *_pair_cells(p["gain"]), *_pair_cells(p["forgetting"]),
                               _items(p), _seeds(p)])
            left_out |= set(p["gain_skipped"]) | set(p["forgetting_skipped"])
    if left_out:  # then Δ covers fewer tasks than the summary's gain/forgetting: say which
        pairs.text += (f" Left out of some pairs (no per-item scores on the same items in both groups): "
                       f"{', '.join(sorted(left_out))}.")
    if not refs:
        pairs.text = f"No reference group matches --baseline {' '.join(opts.baselines)}."
    sections.append(pairs)
    for g in compared:
        ct = C.continual_table(g)
        if ct:
            sec = Section(f"Continual: {g.label} (R[i][j] = stage j's target after stage i, mean over seeds)",
                          ["after stage"] + [str(s) for s in ct["stages"]],
                          [[str(s)] + [_f(v) for v in row] for s, row in zip(ct["stages"], ct["R"])])
            sec.text = "; ".join(f"{k} {_ms(v)}" for k, v in ct["metrics"].items())
            sec.images = [(f"R matrix: {g.label}", _plot("r_matrix", ct["R"], [str(s) for s in ct["stages"]],
                                                         title=g.label))]
            sections.append(sec)
    _images(sections, groups, compared, pareto, task_names, mg, mg_post)
    return {"groups": groups, "compared": compared, "sections": sections, "fairness": unfair, "found": found,
            "matched": mg, "matched_post": mg_post, "pareto": pareto}


def _distance_section(compared) -> Optional[Section]:
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
            sec.rows.append([g.label, len(g.runs), "no close skill", "—", _ms(f), _ci(f), "—", "—"])
            continue
        sec.rows.append([g.label, len(g.runs), _ms(n), _ci(n), _ms(f), _ci(f), _ms(x), _ci(x)])
    sec.text = ("near: mean drop over the pretraining skills structurally close to the target; far: over the others "
                "(result.json summary forgetting_near / forgetting_far; > 0 is worse). near - far is taken within "
                "each run, then folded over seeds: an interval above 0 says the close skills are forgotten more. "
                "'not recorded': no run of the group has the keys (not a world run, or written before them); "
                "'no close skill': a target no pretraining skill is close to (far is then every skill).")
    return sec


def _pair_cells(d: Optional[dict]) -> list[str]:
    if not d:
        return ["no paired records", "—"]
    return [f"{d['diff']:+.1f}{' *' if d['significant'] else ''}", f"[{d['lo']:+.1f}, {d['hi']:+.1f}]"]


def _items(p: dict) -> str:
    return " / ".join(f"{m} {p[m]['items'] if p[m] else 0}" for m in ("gain", "forgetting"))


def _seeds(p: dict) -> str:
    d = p["gain"] or p["forgetting"]
    return f"{d['seeds_a']}/{d['seeds_b']}" if d else "—"


_ALONG = {"interp": "along interpolation toward the base (post=interp variants",
          "lines": "along LiNeS scaling (post=lines variants"}


def _matched_section(mg: dict, kind: Optional[str] = None) -> Section:
    lv = mg["levels"]
    head = (f"Forgetting at matched gain {_ALONG[kind]}" if kind
            else "Forgetting at matched gain along training (from curve.jsonl")
    sec = Section(f"{head}; mean ± std over seeds, rank)", ["group"] + [f"gain {x:g}" for x in lv])
    for i, row in enumerate(mg["rows"]):
        cells = []
        for j, c in enumerate(row["cells"]):
            if c["fold"] is None:
                cells.append(f"not reached ({c['reached']}/{c['n']} seeds)")
            else:
                cells.append(f"{_ms(c['fold'])} (#{mg['ranks'][j][row['label']]})")
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


def _params(p: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in p.items())


def _variants_section(compared) -> Optional[Section]:
    sec = Section("Post-training variants (result.json variants; mean ± std over seeds)",
                  ["group", "variant", "kind", "params", "seeds", "gain", "forgetting"])
    for g in compared:
        for v in C.variants_table(g):
            sec.rows.append([g.label, v["name"], v["kind"], _params(v["params"]), v["gain"]["n"] - v["gain"]["missing"],
                             _ms(v["gain"]), _ms(v["forgetting"])])
    if not sec.rows:
        return None
    sec.text = ("Each variant evaluated on the run's test tasks (records/variant_<name>/); seeds = how many of the "
                "group's seeds have it, and a mean is shown only when all do.")
    return sec


def _plot(name: str, *args, **kw) -> Optional[bytes]:
    from ftlab.report import plots

    return getattr(plots, name)(*args, **kw)


def _variant_lines(g) -> Optional[list[tuple[float, float]]]:
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


def _images(sections: list[Section], groups, compared, pareto, task_names, mg, mg_post=None) -> None:
    pts = [{"label": g.label, "gain": g.stats["gain"]["mean"], "forgetting": g.stats["forgetting"]["mean"],
            "gain_err": _half(g.stats["gain"]), "forgetting_err": _half(g.stats["forgetting"]),
            "selected": g.selected, "group": g.label.split(" [")[0]} for g in groups
           if g.stats["gain"]["mean"] is not None and g.stats["forgetting"]["mean"] is not None]
    vcurves = {g.label.split(" [")[0]: c for g in compared if (c := _variant_lines(g))}
    sections[1].images.append(("Gain vs forgetting (error bars: 95% t-interval; Pareto front marked"
                               + ("; thin lines: post-training variants, mean over seeds" if vcurves else "") + ")",
                               _plot("gain_forgetting", pts, pareto, title="gain vs forgetting",
                                     variant_curves=vcurves or None)))
    points_tasks = [n for n in task_names if compared[0].stats["tasks"].get(n, {}).get("unit", "points") == "points"]
    vals = [[(g.stats["tasks"].get(n) or {}).get("improvement", {}).get("mean") for n in points_tasks]
            for g in compared]
    sections[_index(sections, "Per task")].images.append(
        ("Per-task change (points; red = worse)", _plot("task_heatmap", [g.label for g in compared], points_tasks,
                                                         vals, title="per-task change")))
    along = {f"{lab} ({kind})": c for kind, m in (mg_post or {}).items() for lab, c in m["curves"].items() if c}
    if mg["curves"] or along:
        sections[_index(sections, "Forgetting at matched gain")].images.append(
            ("Forgetting vs gain along training" + (" and along the variants" if along else "")
             + " (first seed of each group)",
             _plot("matched_gain", {**mg["curves"], **along}, mg["levels"] or next(
                 (m["levels"] for m in (mg_post or {}).values() if m["levels"]), []), title="forgetting vs gain")))
    curves = {g.label: [r for r in (g.runs[0].train_curve() or []) if r.get("loss") is not None] for g in compared}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        imgs = [("Training loss (first seed)", _plot("training_curves", curves, key="loss", title="training loss"))]
        probes = {k: [r for r in v if r.get("probe_ppl") is not None] for k, v in curves.items()}
        if any(probes.values()):
            imgs.append(("In-training probe perplexity (first seed)",
                         _plot("training_curves", {k: v for k, v in probes.items() if v}, key="probe_ppl",
                               title="probe perplexity")))
        sections.append(Section("Training curves", images=imgs))
    profiles = {g.label: p for g in compared if (p := C.update_profile(g))}
    if profiles:
        sections.append(Section("Update profile (diagnostics: mean ||dW||/||W|| per layer)",
                                images=[("Relative update per layer", _plot("update_profile", profiles,
                                                                           title="update profile"))]))


def _index(sections: list[Section], prefix: str) -> int:
    return next(i for i, s in enumerate(sections) if s.heading.startswith(prefix))


def _half(fd: dict) -> Optional[float]:
    return (fd["hi"] - fd["mean"]) if fd.get("hi") is not None else None


def _md_table(columns: list[str], rows: list[list[Any]]) -> str:
    def esc(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows])


def markdown(title: str, sections: list[Section], image_names: dict[int, list[str]]) -> str:
    out = [f"# {title}", ""]
    for i, s in enumerate(sections):
        out += [f"## {s.heading}", ""]
        if s.text:
            out += [s.text, ""]
        if s.columns and s.rows:
            out += [_md_table(s.columns, s.rows), ""]
        out += [f"![{cap}]({name})" for cap, name in zip([c for c, _ in s.images], image_names.get(i, []))]
        out.append("")
    return "\n".join(out)


def csv_text(groups: list) -> str:
    """One row per group (every --select candidate too), raw numbers: the table to load elsewhere."""
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = ["gain", "forgetting", "forgetting_max", "retention", "retention_above_chance"]
    dist = [*C.DISTANCE_KEYS, "near_minus_far"] if any(g.stats.get("distance") for g in groups) else []
    w.writerow(["group", "selected", "choice", "n_seeds", "seeds"]
               + [f"{k}_{s}" for k in keys + dist for s in ("mean", "std", "ci_lo", "ci_hi")])
    for g in groups:
        row = [g.label, g.selected, g.chosen or "", len(g.runs), " ".join(map(str, g.seeds))]
        for k in keys + dist:
            fd = (g.stats.get(k) if k in keys else (g.stats.get("distance") or {}).get(k)) or {}
            row += [fd.get("mean"), fd.get("std"), fd.get("lo"), fd.get("hi")]
        w.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def write(opts: Options, log=print) -> dict:
    from ftlab.report.html import build_html, table_html
    from ftlab.utils.files import atomic_write_text

    rep = build(opts, log)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    names: dict[int, list[str]] = {}
    k = 0
    for i, s in enumerate(rep["sections"]):
        for cap, png in s.images:
            k += 1
            name = f"fig{k:02d}.png"
            (out / name).write_bytes(png)
            names.setdefault(i, []).append(name)
    title = "ftlab report"
    atomic_write_text(out / "report.md", markdown(title, rep["sections"], names))
    atomic_write_text(out / "report.csv", csv_text(rep["groups"]))
    html_secs = [{"heading": s.heading,
                  "html": (f"<p>{_esc(s.text)}</p>" if s.text else "")
                  + (table_html(s.columns, s.rows) if s.columns and s.rows else ""),
                  "images": list(s.images)} for s in rep["sections"]]
    atomic_write_text(out / "report.html", build_html(title, html_secs))
    _terminal(rep, log)
    if opts.wandb:
        from ftlab.report.wandb_log import log_report

        tables = {s.heading.split(" (")[0]: (s.columns, s.rows) for s in rep["sections"] if s.columns and s.rows}
        images = {f"{i}_{cap}"[:80]: png for i, s in enumerate(rep["sections"]) for cap, png in s.images}
        rep["wandb"] = log_report(tables, images, dir=str(out))
        log(f"wandb: {rep['wandb']}")
    log(f"wrote {out / 'report.md'}, report.csv, report.html and {k} PNG(s)")
    rep["out"] = out
    return rep


def _esc(s: str) -> str:
    import html

    return html.escape(s)


def _terminal(rep: dict, log) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    for line in rep["fairness"]:
        console.print(f"[yellow]fairness:[/yellow] {line}", highlight=False)
    # the main table, and forgetting by distance when the runs record it
    for sec in rep["sections"][1:3]:
        if sec is not rep["sections"][1] and not sec.heading.startswith("Forgetting by distance"):
            continue
        t = Table(title=sec.heading)
        for c in sec.columns:
            t.add_column(c)
        for r in sec.rows:
            t.add_row(*map(str, r))
        console.print(t)
