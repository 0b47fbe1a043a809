"""The `ftlab` command: dispatch to its subcommands. The CLI package is the only place (with hydra_plugins/) that
imports Hydra; `ftlab --help` imports neither Hydra nor torch."""

from __future__ import annotations

import sys

HELP = """\
usage: ftlab <command> [args]

ftlab measures what a fine-tuning method gains on its target and what the model forgets elsewhere.

commands:
  run [overrides]      train, evaluate base and tuned, report gain and forgetting (a Hydra app)
                       ftlab run                        the embedded default (tiny world, LoRA, CPU, offline)
                       ftlab run method=full data=synth_rot1 train.max_steps=300
                       ftlab run -m method=full,lora seed=0,1,2     a sweep: one run directory per job
                       ftlab run --cfg job              print the validated config
                       ftlab run --help                 config groups, their options and the knobs
  score TASK PREDS     score saved predictions with a task's metric, no model (ftlab score --help)
  report PATH...       compare runs: seeds folded, fairness, matched gain, paired intervals (ftlab report --help)
  merge RUN_DIR... method=M   merge finished runs (soup, greedy_soup, task_arithmetic, ties, dare, breadcrumbs)
                       into a run directory of its own, evaluated like a run (ftlab merge --help)
  version              print the version

Config groups: model, data, method, eval, hw, logger, reg, post; overlays: +experiment=NAME, +debug=fast
(see `ftlab run --help`).
Environment: FTLAB_OUTPUTS (run directories, default ./outputs), FTLAB_CACHE (base models and base
evaluations, default ~/.cache/ftlab).
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        from ftlab.cli.run import run_command

        return run_command(rest)
    if cmd == "score":
        from ftlab.cli.score import score_command

        return score_command(rest)
    if cmd == "report":
        from ftlab.cli.report import report_command

        return report_command(rest)
    if cmd == "merge":
        from ftlab.cli.merge import merge_command

        return merge_command(rest)
    if cmd in ("version", "--version"):
        from ftlab import __version__

        print(f"ftlab {__version__}")
        return 0
    print(f"ftlab: unknown command {cmd!r}\n\n{HELP}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # python -m ftlab.cli
    sys.exit(main())
