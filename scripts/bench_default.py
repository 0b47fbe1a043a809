"""Measure the embedded default: `ftlab run` cold (empty cache: pretrains the tiny world) and warm, and
`method=full` on the same budget. Prints wall times and gain/forgetting; the numbers in README come from here.

    python scripts/bench_default.py [--seeds 0] [--extra key=value ...]
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


def run(args: list[str], env: dict, cwd: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ftlab", "run", *args], env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"ftlab run {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    results = sorted(Path(env["FTLAB_OUTPUTS"]).glob("runs/*/*/result.json"), key=os.path.getmtime)
    return wall, json.loads(results[-1].read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--extra", nargs="*", default=[])
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "FTLAB_CACHE": str(tmp / "cache"), "FTLAB_OUTPUTS": str(tmp / "out"),
               "FTLAB_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        rows = []
        for label, args in [("lora cold", []), ("lora warm", []), ("full warm", ["method=full"])]:
            wall, r = run(args + ns.extra, env, tmp)
            s = r["summary"]
            rows.append((label, wall, s["gain"], s["forgetting"], s["forgetting_max"], r["train"]["wall_s"]))
            base = {k: round(v["base"], 1) for k, v in r["tasks"].items()}
            tuned = {k: round(v["tuned"], 1) for k, v in r["tasks"].items()}
            print(f"{label}: base {base}\n{' ' * len(label)}  tuned {tuned}", flush=True)
        print(f"\n{'run':<10} {'wall_s':>7} {'gain':>6} {'forget':>7} {'f_max':>6} {'train_s':>8}")
        for label, wall, g, f, fm, ts in rows:
            print(f"{label:<10} {wall:7.1f} {g:6.1f} {f:7.1f} {fm:6.1f} {ts:8.1f}")
        print(f"cpu: {os.cpu_count()} cores; date: {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
