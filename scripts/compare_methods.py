"""Every `method=` option on the default tiny world, same budget, several seeds: gain, forgetting, trainable
parameters and optimizer-state bytes per method, written to docs/comparison.md.

    OMP_NUM_THREADS=1 python scripts/compare_methods.py                 # run the sweep, then write the table
    python scripts/compare_methods.py --runs-dir outputs/compare_methods/runs   # only read finished runs

The sweep is one command, `ftlab run -m method=<every method> seed=0,1,2`, with FTLAB_OUTPUTS pointing at
--outputs (default outputs/compare_methods); run directories are named by their config, so a repeated or
interrupted sweep reuses every run that completed. The table reads each run's result.json: summary.gain,
summary.forgetting (points, mean ± sample std over seeds), train.trainable_params, train.optimizer_state_bytes
(peak of the optimizer's state tensors) and its ratio to `full`'s.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# table order: baselines, LoRA family, other peft, partial freezing, sparse/structured
ORDER = ["full", "lora", "rslora", "dora", "pissa", "olora", "corda", "lora_ga", "ia3", "prompt_tuning",
         "freeze", "hft", "lisa", "owlore", "lift", "s2ft", "ssf"]


def methods() -> list[str]:
    from ftlab.config.method import METHODS

    return [m for m in ORDER if m in METHODS] + sorted(set(METHODS.names()) - set(ORDER))


def sweep_command(names: list[str], seeds: list[int], extra: list[str]) -> list[str]:
    return ["ftlab", "run", "-m", f"method={','.join(names)}", f"seed={','.join(map(str, seeds))}", *extra]


def run_sweep(cmd: list[str], outputs: Path) -> None:
    env = {**os.environ, "FTLAB_OUTPUTS": str(outputs), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "FTLAB_WORLD_THREADS": os.environ.get("FTLAB_WORLD_THREADS", "1"), "FTLAB_PROGRESS": "0"}
    print("+", shlex.join(cmd), flush=True)
    # a failed job is recorded (status: failed) and the sweep goes on; a non-zero exit is reported, not fatal
    rc = subprocess.call(cmd, env=env, cwd=ROOT)
    if rc:
        print(f"compare_methods: the sweep exited with {rc}; tabulating what completed", file=sys.stderr)


def load_results(runs_dir: Path) -> list[dict]:
    out = []
    for path in sorted(runs_dir.glob("*/result.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        cfg_path = path.parent / "config.yaml"
        if cfg_path.is_file():
            import yaml

            r["_config"] = yaml.safe_load(cfg_path.read_text())
        r["_dir"] = path.parent.name
        out.append(r)
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(results: list[dict], seeds: list[int] | None) -> tuple[dict[str, dict], list[str]]:
    """{method: row} over completed runs (of `seeds` when given), and 'dir: error' for failed ones."""
    by: dict[str, list[dict]] = {}
    failed = []
    for r in results:
        cfg = r.get("_config") or {}
        name = (cfg.get("method") or {}).get("name")
        if name is None or (seeds is not None and cfg.get("seed") not in seeds):
            continue
        if r.get("status") != "completed":
            failed.append(f"{r['_dir']}: {r.get('status')} {r.get('error') or ''}".strip())
            continue
        by.setdefault(name, []).append(r)
    rows = {}
    for name, rs in by.items():
        s = [r["summary"] for r in rs]
        tr = [r["train"] for r in rs]
        target = [t for t in rs[0]["tasks"].values() if t["role"] == "target"]
        rows[name] = {
            "n": len(rs), "seeds": sorted(r["_config"]["seed"] for r in rs),
            "gain": mean_std([x["gain"] for x in s]), "forgetting": mean_std([x["forgetting"] for x in s]),
            "forgetting_max": mean_std([x["forgetting_max"] for x in s]),
            "retention": mean_std([x["retention"] for x in s]),
            "target_base": target[0]["base"] if target else None,
            "trainable": round(statistics.fmean(t["trainable_params"] for t in tr)),
            "total": tr[0]["total_params"],
            "opt_bytes": round(statistics.fmean(t.get("optimizer_state_bytes", 0) for t in tr)),
            "train_s": statistics.fmean(t["wall_s"] for t in tr),
            "lr": rs[0]["_config"]["train"]["lr"] * (rs[0]["_config"]["method"].get("lr_scale") or 1.0),
            "note": _note(name, rs[0]["train"].get("method") or {}),
        }
    return rows, failed


def _note(name: str, rec: dict) -> str:
    if name == "owlore":
        return "GaLore" if rec.get("galore") else "plain AdamW (galore_torch not installed)"
    if "optimizer_state" in rec:
        return "sparse deltas"
    return ""


def fmt(ms: tuple[float, float]) -> str:
    return f"{ms[0]:.1f} ± {ms[1]:.1f}"


def write_markdown(rows: dict[str, dict], failed: list[str], out: Path, command: str, device: str, date: str,
                   budget: str, notes: list[str]) -> str:
    full = rows.get("full", {}).get("opt_bytes")
    lines = [
        "# Method comparison on the embedded tiny world",
        "",
        f"Every `method=` option, fine-tuned on the default world (`data=synth_sub`, 2-digit subtraction) with the "
        f"same budget ({budget}), seeds {', '.join(map(str, sorted({s for r in rows.values() for s in r['seeds']})))}. "
        "Gain: mean improvement on the target (points); forgetting: mean drop over the six pretraining skills "
        "(points, > 0 is worse); mean ± sample std over seeds. Optimizer state: peak bytes held in the "
        "optimizer's state tensors during training (`train.optimizer_state_bytes`), and its ratio to `full`.",
        "",
        f"Measured on {device}, {date}. Command (from the repository root):",
        "",
        "```",
        command,
        "```",
        "",
        "`OMP_NUM_THREADS=1 python scripts/compare_methods.py` runs exactly that and writes this page from the runs' "
        "result.json (`--runs-dir outputs/compare_methods/runs` re-reads them without running).",
        "",
        "| method | lr | gain | forgetting | forgetting_max | retention | trained params | optimizer state | vs full | "
        "train s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in [m for m in ORDER if m in rows] + sorted(set(rows) - set(ORDER)):
        r = rows[name]
        ratio = f"{r['opt_bytes'] / full:.3f}" if full else "n/a"
        lines.append(f"| `{name}` | {r['lr']:.3g} | {fmt(r['gain'])} | {fmt(r['forgetting'])} | {fmt(r['forgetting_max'])} | "
                     f"{fmt(r['retention'])} | {r['trainable']:,} | {r['opt_bytes']:,} B | {ratio} | "
                     f"{r['train_s']:.1f} | {r['note']} |")
    if "full" in rows:
        lines += ["", f"Base model: {rows['full']['total']:,} parameters (`full` trains them all); target accuracy "
                  f"before tuning: {rows['full']['target_base']:.1f} points. Trained params: at the first step "
                  "(LISA/OwLore re-sample their active block)."]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if failed:
        lines += ["", "Runs that did not complete:", ""] + [f"- {f}" for f in failed]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs-dir", type=Path, help="read finished runs from here instead of running the sweep")
    ap.add_argument("--outputs", type=Path, default=ROOT / "outputs" / "compare_methods")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=None, help="comma list (default: every registered method)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "comparison.md")
    ap.add_argument("--device", default="2-core CPU")
    ap.add_argument("--date", default=_dt.date.today().isoformat())
    ap.add_argument("--note", action="append", default=[], help="a line for the notes under the table")
    ap.add_argument("extra", nargs="*", help="more overrides for every job (e.g. train.max_steps=100)")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    names = a.methods.split(",") if a.methods else methods()
    cmd = sweep_command(names, seeds, a.extra)
    command = shlex.join(["OMP_NUM_THREADS=1", "FTLAB_WORLD_THREADS=1",
                          f"FTLAB_OUTPUTS={os.path.relpath(a.outputs, ROOT)}", *cmd])
    runs_dir = a.runs_dir
    if runs_dir is None:
        run_sweep(cmd, a.outputs)
        runs_dir = a.outputs / "runs"
    rows, failed = aggregate(load_results(runs_dir), seeds)
    rows = {k: v for k, v in rows.items() if k in names}
    any_cfg = next((r["_config"] for r in load_results(runs_dir) if r.get("_config")), {})
    t = any_cfg.get("train", {})
    budget = (f"{t.get('max_steps')} steps, batch {t.get('batch_size')}, train.lr {t.get('lr')}, "
              f"{t.get('schedule')} schedule")
    print(write_markdown(rows, failed, a.out, command, a.device, a.date, budget, a.note))


if __name__ == "__main__":
    main()
