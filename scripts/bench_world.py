#!/usr/bin/env python
"""Build an embedded world's base model (default size: tiny) from cold; report wall time and per-skill accuracy.

Measured 2026-12-04 (one cold build each, seed 0, one pretraining thread, a shared 2-core AVX2 CPU; docs/world.md
"## Sizes"), every size at 1,000 steps of batch 96:

    size    params     width x depth  pretrain s  min skill accuracy (200 test items each)
    tiny    137,792    64 x 2         33-41       93 % (add)
    small   1,062,528  128 x 4        186         99 % (rev, sort)
    medium  5,271,296  256 x 5        773         98.5 % (sort)

Each run builds into a fresh temporary cache (nothing is reused, nothing is left behind), exactly as a first
`ftlab run` would. Timings on a shared machine are noisy: run it a few times.

    python scripts/bench_world.py                # 2 cold builds of the default world
    python scripts/bench_world.py --runs 1 --size small
    python scripts/bench_world.py --runs 3 --set steps=1200 --set seed=1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time


def _parse_set(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, _, v = it.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _busy_seconds() -> float | None:
    """CPU-seconds all processes have spent busy since boot (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[3] - v[4]) / hz  # all but idle and iowait


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2, help="cold builds to time (default 2)")
    ap.add_argument("--size", default=None, help="model.world.size (tiny, small, medium; default: the config's, tiny)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a WorldConfig field, e.g. steps=1200 or skills='[\"add\",\"rev\"]'")
    ap.add_argument("--progress", action="store_true", help="show the pretraining progress bar")
    ap.add_argument("--json", action="store_true", help="print one JSON line per run")
    args = ap.parse_args(argv)

    t_import = time.perf_counter()
    import torch

    from ftlab.world import base, pretrain

    import_s = time.perf_counter() - t_import
    world = base.world_config({**({"size": args.size} if args.size else {}), **_parse_set(args.set)})
    print(f"world {base.world_hash(world)}: {json.dumps(world)}", file=sys.stderr)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, pretraining threads {pretrain.THREADS}, "
          f"imports {import_s:.1f} s", file=sys.stderr)
    rows = []
    for i in range(args.runs):
        tmp = tempfile.mkdtemp(prefix="ftlab-bench-world-")
        try:
            busy0, own0 = _busy_seconds(), time.process_time()
            t0 = time.perf_counter()
            d = base.ensure_base(world, cache_dir=tmp, progress=args.progress)
            total = time.perf_counter() - t0
            busy1, own1 = _busy_seconds(), time.process_time()
            info = json.loads((d / "world.json").read_text())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        info["ensure_base_s"] = round(total, 2)
        # Cores kept busy by *other* processes meanwhile: the noise in these timings on a shared machine.
        info["others_cores"] = None if busy0 is None else round(((busy1 - busy0) - (own1 - own0)) / total, 2)
        rows.append(info)
        if args.json:
            print(json.dumps({k: info[k] for k in ("hash", "train_s", "eval_s", "ensure_base_s", "accuracy",
                                                   "target_accuracy", "num_threads",
                                                   "others_cores")}))
        else:
            acc = "  ".join(f"{s} {a:5.1f}" for s, a in info["accuracy"].items())
            tgt = "  ".join(f"{s} {a:.1f}" for s, a in info["target_accuracy"].items())
            print(f"run {i + 1}: pretrain {info['train_s']:6.1f} s  eval {info['eval_s']:4.1f} s  "
                  f"ensure_base {total:6.1f} s  | {acc}  | min {info['min_accuracy']:.1f}  | targets: {tgt}  "
                  f"| threads {info['num_threads']} "
                  f"| other processes used {info['others_cores']} cores")
    if len(rows) > 1 and not args.json:
        tr = [r["train_s"] for r in rows]
        print(f"pretrain s: median {statistics.median(tr):.1f}, min {min(tr):.1f}, max {max(tr):.1f}; "
              f"worst skill over runs: {min(r['min_accuracy'] for r in rows):.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
