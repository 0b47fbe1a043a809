"""The method comparison of docs/comparison.md: one sweep on the embedded world, then `ftlab report` — a thin wrapper.

    OMP_NUM_THREADS=1 python scripts/compare_methods.py              # run the sweep (resumable), then the report
    python scripts/compare_methods.py --no-run                       # only re-read finished runs

The sweep is every `method=` option x a learning-rate grid (train.lr x the method's lr_scale; 4 values spanning
33x) x 3 seeds, with a validation split (eval.validation=true: the lr is selected on it) and the scored trajectory
(eval.curve_every: forgetting at matched gain). Run directories are named by their config, so an interrupted
sweep resumes. The report (`ftlab report --select train.lr`) goes to docs/comparison/ (report.md, report.html,
report.csv, PNGs); docs/comparison.md is its report.md under a header with the exact commands, plus what the
report does not show: trained parameters and optimizer-state bytes per method, and docs/comparison/notes.md (the
reading of the numbers, written by hand for the sweep they describe) when it exists.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LRS = "0.0003,0.001,0.003,0.01"
ORDER = ["full", "lora", "rslora", "dora", "pissa", "olora", "corda", "lora_ga", "ia3", "prompt_tuning",
         "freeze", "hft", "lisa", "owlore", "lift", "s2ft", "ssf"]


def methods() -> list[str]:
    from ftlab.config.method import METHODS

    return [m for m in ORDER if m in METHODS] + sorted(set(METHODS.names()) - set(ORDER))


def sweep_command(names: list[str], lrs: str, seeds: str, extra: list[str]) -> list[str]:
    return ["ftlab", "run", "-m", f"method={','.join(names)}", f"train.lr={lrs}", f"seed={seeds}",
            "eval.validation=true", "eval.curve_every=25", "eval.curve_limit=100", "hw.num_threads=1", *extra]


def report_command(outputs: Path, out: Path, levels: str | None) -> list[str]:
    return ["ftlab", "report", str(outputs), "--select", "train.lr", *(["--levels", levels] if levels else []),
            "--out", str(out)]


def cost_table(runs_dir: Path, selected: dict[str, str]) -> list[str]:
    """Trained parameters, optimizer-state bytes (peak) and training wall time per method, at the selected lr."""
    import yaml

    by: dict[str, list[dict]] = {}
    for path in sorted(runs_dir.glob("*/result.json")):
        r = json.loads(path.read_text())
        if r.get("status") != "completed":
            continue
        lr = yaml.safe_load((path.parent / "config.yaml").read_text())["train"]["lr"]
        if selected.get(r["method"]) not in (None, f"train.lr={lr:g}", f"train.lr={lr}"):
            continue
        by.setdefault(r["method"], []).append(r["train"])
    full = statistics.fmean(t["optimizer_state_bytes"] for t in by["full"]) if "full" in by else None
    lines = ["| method | selected | trained params | optimizer state | vs full | train s |", "|---|---|---|---|---|---|"]
    for m in [m for m in ORDER if m in by] + sorted(set(by) - set(ORDER)):
        tr = by[m]
        state = statistics.fmean(t["optimizer_state_bytes"] for t in tr)
        lines.append(f"| `{m}` | {selected.get(m, '')} | {round(statistics.fmean(t['trainable_params'] for t in tr)):,} | "
                     f"{round(state):,} B | {state / full:.3f} | {statistics.fmean(t['wall_s'] for t in tr):.1f} |"
                     if full else f"| `{m}` | | | | | |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-run", action="store_true", help="only report on finished runs")
    ap.add_argument("--outputs", type=Path, default=ROOT / "outputs" / "comparison")
    ap.add_argument("--lrs", default=LRS)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--levels", default="10,25,50,75,90", help="gain levels for forgetting at matched gain")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "comparison.md")
    ap.add_argument("--device", default="the 2-core CPU machine (1 thread per run, 2 sweeps side by side)")
    ap.add_argument("--date", default=_dt.date.today().isoformat())
    ap.add_argument("extra", nargs="*", help="more overrides for every job")
    a = ap.parse_args()
    names = methods()
    env = {**os.environ, "FTLAB_OUTPUTS": str(a.outputs), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "FTLAB_PROGRESS": "0"}
    sweep = sweep_command(names, a.lrs, a.seeds, a.extra)
    if not a.no_run:
        print("+", shlex.join(sweep), flush=True)
        if subprocess.call(sweep, env=env, cwd=ROOT):  # failed jobs are recorded and counted by the report
            print("compare_methods: the sweep exited non-zero; reporting what completed", file=sys.stderr)
    rep_dir = a.out.with_suffix("")
    report = report_command(Path(os.path.relpath(a.outputs, ROOT)), Path(os.path.relpath(rep_dir, ROOT)), a.levels)
    print("+", shlex.join(report), flush=True)
    subprocess.check_call(report, env=env, cwd=ROOT)

    with open(rep_dir / "report.csv") as f:
        selected = {row["group"].split("method=")[-1].split()[0]: row["choice"]
                    for row in csv.DictReader(f) if row.get("selected") == "True"}
    body = (rep_dir / "report.md").read_text().split("\n", 1)[1]  # drop its title
    body = body.replace("](fig", f"]({rep_dir.name}/fig")
    rel = os.path.relpath(a.outputs, ROOT)
    shown = [f"FTLAB_OUTPUTS={rel}", "OMP_NUM_THREADS=1", *sweep]
    lines = [
        "# Method comparison on the embedded tiny world",
        "",
        f"Made by `ftlab report` (docs/report.md) from one sweep: every `method=` option ({len(names)}), fine-tuned on "
        "the default world (`data=synth_sub`, 2-digit subtraction; 300 steps, batch 32, cosine schedule) at "
        f"train.lr in {{{a.lrs.replace(',', ', ')}}} (times the method's `lr_scale`), seeds {a.seeds}. The learning rate "
        "is selected per method on a **validation** split (the world's held-out payloads, disjoint from the test "
        "items); the tables show the selected runs' **test** numbers. Forgetting is the mean drop over the six "
        "pretraining skills (points; > 0 is worse), at the selected lr and, from each run's scored trajectory "
        "(`curve.jsonl`, every 25 steps on 100 items per task), at matched gain. Paired intervals resample items and "
        "seeds against `full` and `lora`.",
        "",
        f"Measured on {a.device}, {a.date}. Commands (from the repository root):",
        "",
        "```",
        shlex.join(shown),
        shlex.join(report),
        "```",
        "",
        "`OMP_NUM_THREADS=1 python scripts/compare_methods.py` runs both and writes this page "
        "(`--no-run` re-reads finished runs). The whole report, with its plots embedded: "
        f"[{rep_dir.name}/report.html]({rep_dir.name}/report.html).",
        "",
        *([f"![The report page (headless Chromium, scripts/screenshot_report.py)]({rep_dir.name}/screenshot.png)", ""]
          if (rep_dir / "screenshot.png").exists() else []),
        body.strip(),
        "",
        *([(rep_dir / "notes.md").read_text().strip(), ""] if (rep_dir / "notes.md").exists() else []),
        "## Cost at the selected learning rate",
        "",
        "Trained params: at the first step (LISA/OwLore re-sample their active block). Optimizer state: peak bytes of "
        "the optimizer's state tensors during training (`train.optimizer_state_bytes`), and its ratio to `full`.",
        "",
        *cost_table(a.outputs / "runs", selected),
        "",
    ]
    a.out.write_text("\n".join(lines))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
