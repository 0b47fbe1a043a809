"""Measure the embedded default: `ftlab run` cold (empty FTLAB_CACHE: pretrains the tiny world, evaluates the base)
and warm (the same cache: world and base evaluations reused), and `method=full` warm on the same budget. Prints
wall time, train wall, gain and forgetting per run; the numbers in README come from here.

    python scripts/bench_default.py                                   # the default, as README measures it
    python scripts/bench_default.py --extra train.max_steps=20        # any overrides, applied to every run
    python scripts/bench_default.py --keep /tmp/bench                 # keep caches and run directories

Each run gets its own empty FTLAB_OUTPUTS: a run directory is named by its config, so repeating a config in the
same outputs would return the first run's record instead of training again. Only FTLAB_CACHE is shared, and only
from the cold run on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = [("lora cold", []), ("lora warm", []), ("full warm", ["method=full"])]


def run(args: list[str], env: dict, cwd: Path) -> tuple[float, dict, Path]:
    """One `ftlab run` in a fresh outputs dir; returns wall time, its result.json and its run directory."""
    out = Path(env["FTLAB_OUTPUTS"])
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty: a repeated config would return the earlier record")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ftlab", "run", *args], env=env, cwd=cwd, capture_output=True, text=True,
                       check=False)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"ftlab run {' '.join(args)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    # outputs/runs/<method>_<data>_s<seed>_<digest>/result.json
    results = sorted(out.glob("runs/*/result.json"))
    if len(results) != 1:
        sys.exit(f"expected one result.json under {out}/runs/*/, found {[str(r) for r in results]}\n{p.stderr[-2000:]}")
    record = json.loads(results[0].read_text())
    if record.get("status") != "completed":
        sys.exit(f"{results[0]}: status {record.get('status')!r}, error {record.get('error')!r}")
    if "already completed" in p.stderr:
        sys.exit(f"ftlab run {' '.join(args)} returned an earlier record instead of running:\n{p.stderr[-1000:]}")
    return wall, record, results[0].parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every run, e.g. train.max_steps=20")
    ap.add_argument("--keep", type=Path, default=None, help="work in this (new or empty) directory and keep it")
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = ns.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        cache = tmp / "cache"
        if cache.exists() and any(cache.iterdir()):
            sys.exit(f"{cache} is not empty: the cold run needs an empty FTLAB_CACHE")
        base_env = {**os.environ, "FTLAB_CACHE": str(cache), "FTLAB_PROGRESS": "0", "HF_HUB_OFFLINE": "1",
                    "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
        rows = []
        for i, (label, args) in enumerate(RUNS):
            env = {**base_env, "FTLAB_OUTPUTS": str(tmp / f"out{i}_{label.replace(' ', '_')}")}
            wall, r, run_dir = run(args + ns.extra, env, tmp)
            s, t = r["summary"], r["train"]
            rows.append((label, wall, t["wall_s"], t["steps"], s["gain"], s["forgetting"], s["forgetting_max"],
                         s.get("retention")))
            base = {k: round(v["base"], 1) for k, v in r["tasks"].items()}
            tuned = {k: round(v["tuned"], 1) for k, v in r["tasks"].items()}
            pad = " " * len(label)
            print(f"{label}: {run_dir.name}\n{pad}  base  {base}\n{pad}  tuned {tuned}", flush=True)

        def num(x, width):
            return f"{x:{width}.1f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"

        head = ("run", "wall_s", "train_s", "steps", "gain", "forget", "f_max", "retain")
        print("\n{:<10} {:>7} {:>8} {:>6} {:>6} {:>7} {:>6} {:>7}".format(*head))
        for label, wall, ts, steps, g, f, fm, ret in rows:
            print(f"{label:<10} {wall:7.1f} {num(ts, 8)} {steps:>6} {num(g, 6)} {num(f, 7)} {num(fm, 6)} {num(ret, 7)}")
        threads = os.environ.get("OMP_NUM_THREADS", "default")
        print(f"cpu: {os.cpu_count()} cores (OMP_NUM_THREADS {threads}); date: {time.strftime('%Y-%m-%d %H:%M')}; "
              f"overrides: {' '.join(ns.extra) or 'none'}")
        if ns.keep:
            print(f"kept: {tmp}")


if __name__ == "__main__":
    main()
