"""`ftlab merge`: one model from finished runs of the same base, evaluated like a run, in a run directory of its own.

The merged model is built in place in one loaded base model, parameter by parameter: each run's tensor of that
parameter is read from its export (ftlab.post.weights: a whole model's safetensors, or a LoRA adapter's A and B as
the delta B @ A * s), combined by the method's formula (ftlab.post.formulas) and written over the base tensor. Peak
memory is one model plus, per parameter, one tensor per run; greedy soup, which rebuilds the soup for each candidate,
also keeps one copy of the base (two models in all).

Evaluation is the runs' own: the union of their tasks (a task that is any run's target is a target of the merge),
compared with the base scores the runs recorded (they must agree where tasks are shared). The merged directory holds
config.yaml (the inputs and the knobs), result.json (written by RunRecord, the fields of a run's) and records/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from ftlab.config.post import MergeConfig
from ftlab.post import formulas as F
from ftlab.post.weights import RunWeights, block_index

# model keys that make two runs' bases differ (max_length and the prompt format change prompts, not weights)
BASE_KEYS = ("name_or_path", "revision", "trust_remote_code", "dtype", "world")


class MergeRefused(ValueError):
    """The inputs cannot be merged (not completed, different bases, disagreeing evaluations)."""


@dataclasses.dataclass
class Input:
    run_dir: Path
    config: dict  # config.yaml as plain data
    record: dict  # result.json
    cfg: Any  # the validated RunConfig, with the encoding the run resolved


def read_inputs(run_dirs: list[Path]) -> list[Input]:
    """Every run completed, on the same base (model keys BASE_KEYS, named on a refusal)."""
    import dataclasses as dc

    from ftlab.config.files import load_run_config
    from ftlab.rundir.identity import flatten, run_dir_config
    from ftlab.rundir.record import RunRecord

    if not run_dirs:
        raise MergeRefused("no run directories given")
    out = []
    for d in run_dirs:
        d = Path(d)
        config = run_dir_config(d)
        rec = RunRecord.read(d).data
        if config is None or rec.get("status") != "completed":
            raise MergeRefused(f"{d}: not a completed run (config.yaml and result.json with status completed); "
                               "merge finished runs")
        cfg = load_run_config(d)
        enc = rec.get("encoding") or {}
        cfg = dc.replace(cfg, model=dc.replace(cfg.model, max_length=enc.get("max_length", cfg.model.max_length),
                                               prompt_format=enc.get("prompt_format", cfg.model.prompt_format)))
        out.append(Input(d, config, rec, cfg))
    first = {k: v for k, v in flatten({"model": out[0].config["model"]}).items()
             if k.split(".")[1] in BASE_KEYS}
    for x in out[1:]:
        other = {k: v for k, v in flatten({"model": x.config["model"]}).items() if k.split(".")[1] in BASE_KEYS}
        diff = [f"{k}: {first.get(k)!r} ({out[0].run_dir.name}) vs {other.get(k)!r} ({x.run_dir.name})"
                for k in sorted(set(first) | set(other)) if first.get(k) != other.get(k)]
        if diff:
            raise MergeRefused("runs of different bases (or tokenizers/architectures) cannot be merged: "
                               + "; ".join(diff[:5]))
    return out


def merged_tasks(inputs: list[Input], split: str = "test") -> tuple[list, dict]:
    """The union of the runs' tasks (target if any run targets it) and the base scores the runs recorded, checked to
    agree where runs share a task."""
    from ftlab.eval.suites import build_tasks

    tasks: dict[str, Any] = {}
    base: dict[str, dict] = {}
    for x in inputs:
        table = x.record.get("tasks") if split == "test" else (x.record.get("validation") or {}).get("tasks")
        if table is None:
            raise MergeRefused(f"{x.run_dir}: no validation scores in result.json; run it with eval.validation=true "
                               "(greedy soup selects on the validation split, never on test)")
        for t in build_tasks(x.cfg, split):
            if t.name not in table:
                raise MergeRefused(f"{x.run_dir}/result.json: no score for task {t.name}; its eval config changed "
                                   "since the run completed")
            e = table[t.name]
            if t.name in base:
                b = base[t.name]
                if (b["score"], b["n"]) != (e["base"], e["n"]):
                    raise MergeRefused(f"task {t.name}: the runs scored the base differently ({b['score']} on "
                                       f"{b['n']} items vs {e['base']} on {e['n']} in {x.run_dir.name}); their eval "
                                       "configs differ (eval.limit?), so one merged evaluation cannot serve both")
                if t.role == "target":
                    tasks[t.name].role = "target"
                continue
            tasks[t.name] = t
            base[t.name] = {"score": e["base"], "n": e["n"], "metrics": (e.get("metrics") or {}).get("base"),
                            "cached": True}
    return list(tasks.values()), base


class Merger:
    """The base model and the runs' exports; `build(indices)` writes the merged weights of those runs into it."""

    def __init__(self, inputs: list[Input], mc: MergeConfig, device: str, keep_base: bool):
        from ftlab.models.loading import load_model, load_tokenizer
        from ftlab.models.structure import decoder_layers

        self.mc = mc
        self.tok = load_tokenizer(inputs[0].cfg.model)
        self.model = load_model(inputs[0].cfg.model, self.tok, device=device)
        self.sources = [RunWeights(x.run_dir) for x in inputs]
        names = {n for n, _ in self.model.named_parameters()}
        for s in self.sources:
            s.check_fits(names)
        self.changed = set().union(*(s.names for s in self.sources))
        self.prefix, layers = decoder_layers(self.model)
        self.n_blocks = len(layers)
        self._base = ({n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()
                       if n in self.changed} if keep_base else None)

    def build(self, indices: Optional[list[int]] = None) -> None:
        idx = list(range(len(self.sources))) if indices is None else list(indices)
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n not in self.changed:
                    continue
                base = self._base[n] if self._base is not None else p.detach().cpu()
                p.copy_(self._merged(n, base, idx).to(p.device, p.dtype))

    def _merged(self, n: str, base: torch.Tensor, idx: list[int]) -> torch.Tensor:
        mc = self.mc
        if mc.method in ("soup", "greedy_soup"):
            return F.soup([self.sources[i].tuned(n, base) for i in idx])
        deltas = []
        for i in idx:
            d = self.sources[i].delta(n, base)
            deltas.append(torch.zeros(base.shape) if d is None else d)
        if mc.method == "task_arithmetic":
            merged = F.task_arithmetic(deltas)
        elif mc.method == "ties":
            merged = F.ties(deltas, mc.resolved_density(), mc.sign)
        elif mc.method == "dare":
            merged = F.task_arithmetic([F.dare(d, mc.drop, mc.rescale, F.tensor_generator(mc.seed, i, n))
                                        for i, d in zip(idx, deltas)])
        elif mc.method == "breadcrumbs":
            merged = F.breadcrumbs(deltas, mc.resolved_density(), mc.gamma)
        else:
            raise ValueError(f"method: unknown merge method {mc.method!r}")
        f = mc.scale
        if mc.lines_alpha is not None:
            f *= F.lines_factor(block_index(n, self.prefix), self.n_blocks, mc.lines_alpha, mc.lines_beta)
        return base.float() + f * merged


def _target_mean(table: dict) -> Optional[float]:
    xs = [e["tuned"] for e in table.values() if e["role"] == "target" and e.get("unit", "points") == "points"]
    return sum(xs) / len(xs) if xs else None


def merged_config(inputs: list[Input], mc: MergeConfig) -> dict:
    """config.yaml of the merged run: the knobs as its `method`, the base's model and the first run's eval, and
    `merge.inputs` naming every run (directory, id, method, data, seed, config digest)."""
    first = inputs[0].config
    knobs = {k: v for k, v in dataclasses.asdict(mc).items() if k not in ("out_dir", "name", "save")}
    return {
        "seed": mc.seed,
        "method": {"name": f"merge_{mc.method}", **knobs},
        "model": first["model"],
        "data": {"name": "+".join(str(x.config["data"]["name"]) for x in inputs)},
        "eval": first.get("eval"),
        "merge": {"inputs": [{"run_dir": str(x.run_dir.resolve()), "run_id": x.record.get("run_id"),
                              "method": x.config["method"]["name"], "data": x.config["data"]["name"],
                              "seed": x.config.get("seed"), "config_sha256": x.record.get("config_sha256")}
                             for x in inputs]},
    }


def merged_run_dir(config: dict, mc: MergeConfig) -> Path:
    root = Path(mc.out_dir or os.environ.get("FTLAB_OUTPUTS") or "outputs").expanduser()
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    import re

    data = re.sub(r"[^A-Za-z0-9+._-]+", "-", config["data"]["name"])[:80]
    return root / "runs" / (mc.name or f"merge-{mc.method}_{data}_s{mc.seed}_{digest}")


def merge_runs(run_dirs: list[Path], mc: MergeConfig, device: str = "cpu", progress: bool = False) -> tuple[Path, dict]:
    """Merge, evaluate and record; (the merged run directory, its result.json). A merged directory that already
    completed with the same config is returned as it is."""
    import yaml

    from ftlab.config.files import CONFIG
    from ftlab.eval.evaluate import evaluate
    from ftlab.eval.metrics import summarize
    from ftlab.eval.table import task_table
    from ftlab.rundir.layout import locked
    from ftlab.rundir.record import RunRecord, env_info
    from ftlab.utils.files import atomic_write_text
    from ftlab.utils.memory import PhasePeaks

    inputs = read_inputs(run_dirs)
    greedy = mc.method == "greedy_soup"
    with_val = greedy or all(x.record.get("validation") for x in inputs)
    tasks, base = merged_tasks(inputs)
    val_tasks, val_base = merged_tasks(inputs, "validation") if with_val else ([], None)
    config = merged_config(inputs, mc)
    run_dir = merged_run_dir(config, mc)
    run_dir.mkdir(parents=True, exist_ok=True)
    with locked(run_dir):
        rec = RunRecord.read(run_dir)
        if rec.status == "completed" and (run_dir / CONFIG).is_file() \
                and yaml.safe_load((run_dir / CONFIG).read_text()) == config \
                and (not mc.save or (run_dir / "model").is_dir()):
            return run_dir, rec.data
        atomic_write_text(run_dir / CONFIG, yaml.safe_dump(config, sort_keys=False))
        rec = RunRecord(run_dir)
        rec.start(run_dir.name, config, env_info(device))
        peaks = PhasePeaks(device)
        try:
            with peaks.phase("merge"):
                m = Merger(inputs, mc, device, keep_base=greedy)
                section: dict = {"method": mc.method, "inputs": config["merge"]["inputs"],
                                 "sources": [s.kind for s in m.sources]}
                if greedy:
                    section["greedy"] = _greedy(m, inputs, val_tasks, val_base, mc, run_dir, progress)
                    m.build(section["greedy"]["chosen"])
                else:
                    m.build()
            with peaks.phase("eval_tuned"):
                scores = evaluate(m.model, m.tok, tasks, inputs[0].cfg.eval.batch_size, stage="tuned",
                                  run_dir=run_dir, progress=progress)
                table = task_table(tasks, base, scores)
                if val_tasks:
                    vs = evaluate(m.model, m.tok, val_tasks, inputs[0].cfg.eval.batch_size,
                                  stage="validation_tuned", run_dir=run_dir, progress=progress)
                    vt = task_table(val_tasks, val_base, vs)
                    rec.update(validation={"tasks": vt, "summary": summarize(vt)})
            if mc.save:
                from ftlab.utils.files import atomic_dir

                with atomic_dir(run_dir / "model") as tmp:
                    m.model.save_pretrained(tmp, safe_serialization=True)
                    m.tok.save_pretrained(tmp)
                section["saved"] = "model"
            rec.update(summary=summarize(table), tasks=table, merge=section, memory=peaks.record())
            rec.complete()
        except BaseException as e:
            rec.fail(f"{type(e).__name__}: {e}")
            raise
    return run_dir, rec.data


def _greedy(m: Merger, inputs: list[Input], val_tasks: list, val_base: dict, mc: MergeConfig, run_dir: Path,
            progress: bool) -> dict:
    """Greedy soup on the validation split: each run's own validation score orders them; each candidate soup is built
    and scored (mean target score in points) on the merged validation tasks."""
    from ftlab.eval.evaluate import evaluate
    from ftlab.eval.table import task_table

    own = []
    for x in inputs:
        s = _target_mean(x.record["validation"]["tasks"])
        if s is None:
            raise MergeRefused(f"{x.run_dir}: no target task scored in points on validation; greedy soup needs one")
        own.append(s)
    tried: dict[tuple, float] = {}

    def score(idx: list[int]) -> float:
        m.build(idx)
        key = "-".join(str(i) for i in idx)
        vs = evaluate(m.model, m.tok, val_tasks, inputs[0].cfg.eval.batch_size, stage=f"greedy_{key}",
                      run_dir=run_dir, progress=progress)
        tried[tuple(idx)] = _target_mean(task_table(val_tasks, val_base, vs))
        return tried[tuple(idx)]

    out = F.greedy_soup_order(own, score)
    out["own_scores"] = own
    return out
