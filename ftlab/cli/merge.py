"""`ftlab merge RUN_DIR... method=<name> [key=value ...]`: merge finished runs of one base (ftlab.post.merge)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

MERGE_USAGE = """\
usage: ftlab merge RUN_DIR [RUN_DIR ...] method=<soup|greedy_soup|task_arithmetic|ties|dare|breadcrumbs> [key=value ...]

Build one model from finished runs of the same base, evaluate it on the union of their tasks (against the base
scores they recorded) and write a run directory of its own (config.yaml names the inputs; result.json as a run's),
so `ftlab report` lists it beside the runs. Full-weight runs are read tensor by tensor from their safetensors,
LoRA runs as their weight deltas B @ A * scaling.

  soup             mean of the fine-tuned weights
  greedy_soup      runs sorted by their validation score, each kept if the soup's validation score does not drop
                   (the runs need eval.validation=true)
  task_arithmetic  base + scale * sum of task vectors
  ties             trim each task vector to its top `density` (0.2), elect signs (`sign`: total | frequency),
                   average the agreeing entries; base + scale * that
  dare             drop each delta entry with probability `drop` (0.9), rescale by 1/(1-drop) (`rescale`), sum
  breadcrumbs      mask the top `gamma` (0.01) and the smallest entries down to `density` (0.9), sum

knobs: scale=1.0 density=null sign=total drop=0.9 rescale=true gamma=0.01 lines_alpha=null lines_beta=null
       (LiNeS on the merged delta) seed=0 save=false (also save the merged model as model/, an HF directory)
       out_dir=null (default $FTLAB_OUTPUTS or ./outputs; the merge goes to <out_dir>/runs/) name=null
Defaults and their sources: docs/post.md.
"""


def parse_merge_args(args: list[str]):
    """(run directories, validated MergeConfig); ConfigError naming the key on a bad knob."""
    import dataclasses

    import yaml

    from ftlab.config.post import MergeConfig, check_merge
    from ftlab.config.registry import ConfigError

    dirs, knobs = [], {}
    fields = {f.name: f for f in dataclasses.fields(MergeConfig)}
    for a in args:
        if "=" not in a:
            dirs.append(Path(a))
            continue
        key, value = a.split("=", 1)
        key = key.lstrip("+")
        if key not in fields:
            raise ConfigError(f"{key}: unknown merge knob; valid: {', '.join(fields)}")
        try:
            knobs[key] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            knobs[key] = value
    mc = MergeConfig(**knobs)
    for k, v in knobs.items():
        want = {"method": str, "sign": str, "out_dir": (str, type(None)), "name": (str, type(None)),
                "rescale": bool, "save": bool, "seed": int}.get(k)
        if want is not None and not isinstance(v, want) or (k == "seed" and isinstance(v, bool)):
            raise ConfigError(f"{k}: wrong type {type(v).__name__} ({v!r})")
    check_merge(mc)
    return dirs, mc


def merge_command(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(MERGE_USAGE)
        return 0 if args else 2
    from ftlab.config.registry import ConfigError

    try:
        dirs, mc = parse_merge_args(args)
    except (ConfigError, TypeError) as e:
        print(f"ftlab merge: {e}", file=sys.stderr)
        return 2
    from ftlab.post.merge import MergeRefused, merge_runs
    from ftlab.utils.quiet import quiet_third_party

    quiet_third_party()
    try:
        run_dir, result = merge_runs(dirs, mc)
    except (MergeRefused, FileNotFoundError, ValueError) as e:
        print(f"ftlab merge: refused: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"run_dir": str(run_dir), "summary": result.get("summary"),
                      "tasks": {k: v.get("tuned") for k, v in (result.get("tasks") or {}).items()}}, indent=2))
    return 0
