"""`ftlab report PATH...`: compare runs (docs/report.md). No torch, no Hydra: it reads run directories."""

from __future__ import annotations

__all__ = ["report_command", "REPORT_USAGE"]

REPORT_USAGE = """\
usage: ftlab report PATH... [--over KEY]... [--select KEY] [--levels G1,G2,...] [--baseline KEY=VALUE]...
                    [--out DIR] [--strict] [--wandb] [--boot N]

Compare runs: every run directory under the PATHs (run, sweep or parent directories; local or SLURM layouts) is
found and counted (completed / running / failed / preempted / pending; copies of one run count once); completed
runs are grouped by their config minus seed and folded over seeds (mean, std, n, 95% t-interval).
  --over KEY          fold this config key too (e.g. --over data.name), repeatable
  --select KEY        per group without KEY, keep the KEY value with the best VALIDATION gain (ties: lower
                      validation forgetting) and report its TEST numbers (runs need eval.validation=true)
  --levels G,...      gain levels for forgetting at matched gain (default: 4 levels up to the highest gain every
                      compared run reaches on its curve.jsonl; the variant tables use the same levels)
  --baseline K=V      reference groups for the paired bootstrap (default: method=full and method=lora)
  --out DIR           where report.md, report.csv, report.html and the PNGs go (default ./report)
  --strict            refuse (exit 2) when the compared groups differ in base model, target data, evaluation
                      suite, item sets, prompt format or step budget
  --wandb             also log the tables and plots to a wandb run (offline unless WANDB_MODE says otherwise)
  --boot N            bootstrap resamples (default 2000)
"""


def report_command(args: list[str]) -> int:
    import argparse
    import sys

    from ftlab.report.render import Options, write
    from ftlab.report.runs import ReportError

    if not args or args[0] in ("-h", "--help"):
        print(REPORT_USAGE)
        return 0 if args else 2
    p = argparse.ArgumentParser(prog="ftlab report", add_help=False)
    p.add_argument("paths", nargs="+")
    p.add_argument("--over", action="append", default=[])
    p.add_argument("--select")
    p.add_argument("--levels")
    p.add_argument("--baseline", action="append")
    p.add_argument("--out", default="report")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--wandb", action="store_true")
    p.add_argument("--boot", type=int, default=2000)
    try:
        a = p.parse_args(args)
    except SystemExit:
        print(REPORT_USAGE, file=sys.stderr)
        return 2
    try:
        levels = [float(x) for x in a.levels.split(",")] if a.levels else None
    except ValueError:
        print(f"ftlab report: --levels {a.levels}: give comma-separated numbers, e.g. --levels 10,20,30",
              file=sys.stderr)
        return 2
    if a.boot < 100:
        print(f"ftlab report: --boot {a.boot}: use at least 100 resamples (2000 is the default)", file=sys.stderr)
        return 2
    opts = Options(paths=a.paths, over=tuple(a.over), select=a.select, levels=levels, out=a.out, strict=a.strict,
                   wandb=a.wandb, n_boot=a.boot, **({"baselines": a.baseline} if a.baseline else {}))
    try:
        write(opts)
    except ReportError as e:
        print(f"ftlab report: {e}", file=sys.stderr)
        return 2
    return 0
