"""`ftlab report` end to end: discover, group (or select), check fairness, compute, and write the terminal table,
report.md, report.csv, report.html with its plots, and optionally a wandb run. docs/report.md documents it."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ftlab.report import compare as C
from ftlab.report.runs import ReportError, check_key, discover
from ftlab.report.sections import (
    Section,
    add_images,
    distance_section,
    interval,
    items_cell,
    matched_section,
    mean_std,
    num,
    pair_cells,
    plot,
    seeds_cell,
    task_head,
    variants_section,
)


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
        main.rows.append([g.label, len(g.runs), mean_std(s["gain"]), interval(s["gain"]), mean_std(s["forgetting"]),
                          interval(s["forgetting"]), mean_std(s["forgetting_max"]), mean_std(s["retention"]),
                          mean_std(s["retention_above_chance"]), "*" if g.label in pareto else ""]
                         + ([g.chosen, mean_std(s["validation"]["gain"])] if opts.select else []))
    main.text = ("Forgetting is the mean drop over forget tasks (> 0 is worse); worst task drop is the largest one. "
                 "Retention above chance = (tuned - chance)/(base - chance) over tasks that record their chance level. "
                 "* = on the Pareto front of mean gain (max) and mean forgetting (min).")
    sections.append(main)
    dist = distance_section(compared)
    if dist:
        sections.append(dist)
    if opts.select:
        cand = Section(f"Every {opts.select} candidate (selection reads validation only)",
                       ["group", opts.select, "selected", "validation gain", "validation forgetting", "test gain",
                        "test forgetting"])
        for g in groups:
            cand.rows.append([g.label, g.chosen.split("=", 1)[1], "yes" if g.selected else "",
                              mean_std(g.stats["validation"]["gain"]), mean_std(g.stats["validation"]["forgetting"]),
                              mean_std(g.stats["gain"]), mean_std(g.stats["forgetting"])])
        sections.append(cand)
    task_names = list(dict.fromkeys(n for g in compared for n in g.stats["tasks"]))
    tasks = Section("Per task: change tuned - base (mean ± std over seeds; positive = better, perplexity: base - tuned)",
                    ["group"] + [task_head(n, next(g.stats["tasks"][n] for g in compared if n in g.stats["tasks"]))
                                 for n in task_names])
    for g in compared:
        tasks.rows.append([g.label] + [mean_std(g.stats["tasks"][n]["improvement"],
                                           1 if g.stats["tasks"][n]["unit"] == "points" else 3)
                                       if n in g.stats["tasks"] else "—" for n in task_names])
    sections.append(tasks)
    mg = C.matched_gain(compared, opts.levels)
    sections.append(matched_section(mg))
    # the same levels as along training where there are any, so the two tables' columns compare cell by cell
    mg_post = {}
    for kind in C.VARIANT_KINDS:
        if any(C.variant_trajectory(r, kind) for g in compared for r in g.runs):
            m = C.matched_gain(compared, opts.levels or mg["levels"] or None,
                               traj=lambda r, k=kind: C.variant_trajectory(r, k))
            mg_post[kind] = m
            sections.append(matched_section(m, kind))
    vsec = variants_section(compared)
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
            pairs.rows.append([g.label, ref.label, *pair_cells(p["gain"]), *pair_cells(p["forgetting"]),
                               items_cell(p), seeds_cell(p)])
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
                          [[str(s)] + [num(v) for v in row] for s, row in zip(ct["stages"], ct["R"])])
            sec.text = "; ".join(f"{k} {mean_std(v)}" for k, v in ct["metrics"].items())
            sec.images = [(f"R matrix: {g.label}", plot("r_matrix", ct["R"], [str(s) for s in ct["stages"]],
                                                         title=g.label))]
            sections.append(sec)
    add_images(sections, groups, compared, pareto, task_names, mg, mg_post)
    return {"groups": groups, "compared": compared, "sections": sections, "fairness": unfair, "found": found,
            "matched": mg, "matched_post": mg_post, "pareto": pareto}


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
