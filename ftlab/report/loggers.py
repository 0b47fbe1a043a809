"""Where metrics go besides the run directory: the console always, wandb when logger=wandb."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol


class Logger(Protocol):
    def log(self, row: dict) -> None: ...
    def finish(self, result: dict) -> None: ...


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def continual_table(c: dict):
    """R[i][j] of a continual run (rows: after stage i; columns: stage j's target) with its summary."""
    from rich.table import Table

    fm = c.get("forgetting_mean")
    table = Table(title=f"continual: average accuracy {_fmt(c['average_accuracy'])}, backward transfer "
                        f"{_fmt(c['bwt'])}, forgetting {_fmt(fm)} (points)")
    table.add_column("after stage")
    for name in c["stages"]:
        table.add_column(name, justify="right")
    table.add_row("base", *(_fmt(x) for x in c.get("base") or [None] * len(c["stages"])))
    for i, row in enumerate(c["R"]):
        table.add_row(f"{i} {c['stages'][i]}", *(_fmt(x) for x in row))
    return table


def results_table(result: dict):
    """The run's task table (task, role, metric, base, tuned, delta) and its summary, as rich renderables."""
    from rich.table import Table

    table = Table(title=f"{result['run_id']}  ({result['method']} on {result['data']}, seed {result['seed']})")
    for col in ("task", "role", "metric", "base", "tuned", "delta"):
        table.add_column(col, justify="left" if col in ("task", "role", "metric") else "right")
    for name, t in result["tasks"].items():
        better = (t["delta"] > 0) == t["higher_is_better"]
        style = "" if abs(t["delta"]) < 1e-9 else ("green" if better else "red")
        table.add_row(name, t["role"], t["metric"], f"{t['base']:.2f}", f"{t['tuned']:.2f}",
                      f"[{style}]{t['delta']:+.2f}[/{style}]" if style else f"{t['delta']:+.2f}")
    s = result["summary"]
    summary = Table(title="summary (points; forgetting > 0 means worse)", show_header=True)
    keys = ("gain", "forgetting", "forgetting_max", "retention", "forget_ppl_change_pct")
    for k in keys:
        summary.add_column(k, justify="right")
    summary.add_row(*(_fmt(s.get(k)) for k in keys))
    return table, summary


class ConsoleLogger:
    def __init__(self, cfg: Any, run_dir: Path):
        self.run_dir = run_dir

    def log(self, row: dict) -> None:
        pass  # the progress bar shows the curve live; metrics.jsonl keeps it

    def finish(self, result: dict) -> None:
        from rich.console import Console

        console = Console()
        for r in results_table(result):
            console.print(r)
        if result.get("continual"):
            console.print(continual_table(result["continual"]))
        tr = result["train"]
        console.print(f"trained {tr['trainable_params']:,} of {tr['total_params']:,} parameters, "
                      f"{tr['steps']} steps in {tr['wall_s']:.1f} s ({tr['tokens_per_s']:,.0f} tok/s); "
                      f"record: {self.run_dir / 'result.json'}")


class WandbLogger(ConsoleLogger):
    """wandb run with the config, the training curve and the summary; offline files under the run dir
    unless logger.mode=online. The API key is read by wandb from the environment only."""

    def __init__(self, cfg: Any, run_dir: Path, config: dict, run_id: str):
        super().__init__(cfg, run_dir)
        import wandb

        lg = cfg.logger
        self.wandb = wandb
        self.run = wandb.init(project=lg.project, entity=lg.entity, mode=lg.mode, dir=str(run_dir),
                              name=run_id, id=_wandb_id(run_id), config=config, tags=list(lg.tags),
                              resume="allow", reinit="finish_previous")

    def log(self, row: dict) -> None:
        try:
            if self.run is not None:
                self.run.log({f"train/{k}": v for k, v in row.items() if k != "step" and v is not None},
                             step=row["step"])
        except Exception as e:
            self._lost(e)

    def _lost(self, e: Exception) -> None:
        """wandb mirrors the run directory and never stops a run: in a SLURM job its service process gets the
        scheduler's SIGTERM too and dies while the run still finishes its step and checkpoints."""
        import sys

        print(f"ftlab: wandb failed ({type(e).__name__}: {e}); no more wandb logging in this process, the run "
              f"directory keeps everything", file=sys.stderr)
        self.run = None

    def finish(self, result: dict) -> None:
        super().finish(result)
        if self.run is None:
            return
        try:
            self._finish(result)
        except Exception as e:
            self._lost(e)

    def _finish(self, result: dict) -> None:
        for k, v in result["summary"].items():
            self.run.summary[k] = v
        c = result.get("continual") or {}
        for k in ("average_accuracy", "bwt", "forgetting_mean", "fwt"):
            if c.get(k) is not None:
                self.run.summary[f"continual/{k}"] = c[k]
        d = result.get("diagnostics") or {}
        for role in ("target", "forget"):
            if (d.get("tuco") or {}).get(role, {}).get("mean") is not None:
                self.run.summary[f"diagnostics/tuco_{role}"] = d["tuco"][role]["mean"]
        w = d.get("weights") or {}
        if w.get("main_key") and w.get("intruders"):
            self.run.summary[f"diagnostics/intruders_{w['main_key']}"] = w["intruders"][w["main_key"]]
        if w.get("rel_update_mean") is not None:
            self.run.summary["diagnostics/rel_update_mean"] = w["rel_update_mean"]
        for name, t in result["tasks"].items():
            self.run.summary[f"tasks/{name}/base"] = t["base"]
            self.run.summary[f"tasks/{name}/tuned"] = t["tuned"]
            self.run.summary[f"tasks/{name}/delta"] = t["delta"]
        rows = [[n, t["role"], t["metric"], t["base"], t["tuned"], t["delta"]] for n, t in result["tasks"].items()]
        self.run.log({"eval/tasks": self.wandb.Table(columns=["task", "role", "metric", "base", "tuned", "delta"],
                                                     data=rows)})
        self.run.finish()

    def abort(self) -> None:
        try:
            if self.run is not None:
                self.run.finish(exit_code=1)
        except Exception as e:
            self._lost(e)


def _wandb_id(run_id: str) -> str:
    # wandb ids: no slashes or colons; one logical run, one id.
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in run_id)[-64:]


def build_logger(cfg: Any, run_dir: Path, config: dict, run_id: str) -> Logger:
    if cfg.logger.name == "wandb" and cfg.logger.mode != "disabled":
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        return WandbLogger(cfg, run_dir, config, run_id)
    return ConsoleLogger(cfg, run_dir)
