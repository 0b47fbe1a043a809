"""Continual stages: `data=[a,b,c]` (or `stages=[a,b,c]`) expanded to one full data config per stage, and the
rules a continual run follows."""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf

from ftlab.config.bounds import choice
from ftlab.config.checks import check_ranges
from ftlab.config.registry import ConfigError
from ftlab.config.schema import DataConfig, RunConfig


def data_options() -> list[str]:
    """The `data` group's options (conf/data/*.yaml)."""
    from pathlib import Path

    from ftlab.config.conf import conf_dir

    return sorted(p.stem for p in (Path(conf_dir()) / "data").glob("*.yaml"))


def expand_stages(cfg: DictConfig) -> None:
    """`stages` given as data option names become full data configs, in place: option i's YAML over the schema
    defaults plus the user's `data.*` overrides (the keys where the composed `data` differs from its own
    option), so `data=[a,b] data.n_train=256` trains 256 rows in every stage, as `data=a` and `data=b` would.
    `data` becomes stage 0. Stages that are already data configs (a run directory's config.yaml) stay."""
    from pathlib import Path

    from ftlab.config.conf import conf_dir

    stages = cfg.get("stages")
    if not stages or all(isinstance(s, (dict, DictConfig)) for s in stages):
        return
    if not all(isinstance(s, str) for s in stages):
        raise ConfigError(f"stages: give data option names, e.g. stages=[synth_sub,synth_rot1] (or "
                          f"data=[synth_sub,synth_rot1]), got {OmegaConf.to_container(stages)}")
    valid = data_options()
    for i, name in enumerate(stages):
        choice(f"stages[{i}]", name, valid)
    root = Path(conf_dir()) / "data"

    def option(name: str) -> DictConfig:
        return OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(root / f"{name}.yaml"))

    data = cfg.get("data")
    composed = OmegaConf.to_container(data, resolve=False) if data is not None else {}
    own = OmegaConf.to_container(option(composed["name"]), resolve=False) if composed.get("name") in valid else {}
    overrides = {k: v for k, v in composed.items() if k not in own or own[k] != v}
    expanded = [data if data is not None and name == composed.get("name") else OmegaConf.merge(option(name), overrides)
                for name in stages]
    cfg.stages = expanded
    cfg.data = expanded[0]


def check_stages(c: RunConfig) -> None:
    """A continual run: at least two distinct stages, `data` is stage 0, every stage passes the data checks, the
    eval scores every stage's target; one process (stage evaluations run between stages on rank 0 only)."""
    if not c.stages:
        if c.data.replay_previous > 0:
            raise ConfigError(f"data.replay_previous: {c.data.replay_previous} replays earlier stages' rows, and a "
                              "single run has none; give the stages (data=[a,b,...]), or replay pretraining data with "
                              "data.mix")
        return
    names = [s.name for s in c.stages]
    if len(names) < 2:
        raise ConfigError(f"stages: a continual run needs at least two stages, got {names}; for one, use data={names[0]}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"stages: {dup} appear more than once in {names}; each stage's target is scored under its "
                          "data name, so stage names must differ")
    if c.data != c.stages[0]:
        raise ConfigError(f"data: a continual run's data is its first stage ({names[0]}), got data.name={c.data.name}; "
                          f"set the stages with data=[{','.join(names)}]")
    if "data" not in c.eval.target:
        raise ConfigError(f"eval.target: a continual run scores every stage's held-out split after each stage; "
                          f"include data, e.g. eval.target=[data], got {c.eval.target}")
    if c.hw.nproc * c.hw.nnodes > 1:
        raise ConfigError(f"stages: continual runs use one process for now (stage evaluations run between "
                          f"stages); got hw.nproc={c.hw.nproc} x hw.nnodes={c.hw.nnodes}")
    for i, stage in enumerate(c.stages[1:], 1):
        try:
            check_ranges(dataclasses.replace(c, data=stage, stages=[]))
        except ConfigError as e:
            raise ConfigError(f"stages[{i}] ({stage.name}): {e}") from None
