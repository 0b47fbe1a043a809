"""The `reg` config group: a regulariser composable with any method, and the registry of regularisers (filled beside
their code in ftlab.train.regularisers, which imports torch only where it is used)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ftlab.config.bounds import choice
from ftlab.config.registry import ConfigError, Registry

KL_ON = ("task", "mix", "both")


@dataclass
class RegConfig:
    """A regulariser composable with any method (config group `reg`)."""

    # none | kl (a KL-to-the-base term in the loss) | l2sp (decoupled decay of the weight change toward the start)
    kind: str = "none"
    weight: float = 0.0
    # kl: which rows the KL is on: task (the training batch's rows) | mix (a batch of general rows, the source
    # data.mix replays: data.mix_source or the world's pretraining skills) | both (the sum of the two)
    kl_on: str = "task"


# kind -> the Regulariser class, registered beside its code in ftlab.train.regularisers (torch-free at import).
REGULARISERS: Registry = Registry("regulariser", "reg.kind", discover="ftlab.train.regularisers")


def check_reg(reg: RegConfig, run: Optional[Any] = None) -> None:
    """Range checks of the reg group (its kind is a registered regulariser); with the whole run config, the rules
    across groups (reg.kl_on=mix|both needs general rows and one process)."""
    REGULARISERS.check(reg.kind)
    if not (isinstance(reg.weight, (int, float)) and reg.weight >= 0):
        raise ConfigError(f"reg.weight: must be >= 0, got {reg.weight!r}")
    if reg.kind != "none" and reg.weight == 0:
        raise ConfigError(f"reg.weight: reg.kind={reg.kind} needs a weight > 0 (e.g. reg.weight=0.1), got 0")
    choice("reg.kl_on", reg.kl_on, KL_ON)
    if reg.kl_on != "task" and reg.kind != "kl":
        raise ConfigError(f"reg.kl_on: only reg.kind=kl reads it (got reg.kind={reg.kind}, reg.kl_on={reg.kl_on})")
    if run is None or reg.kind != "kl" or reg.kl_on == "task":
        return
    d, h = run.data, run.hw
    if d.mix_source is None and not (d.source == "synth" and d.mix_skills):
        raise ConfigError(f"reg.kl_on: {reg.kl_on} computes the KL on general rows, and this data has none: set "
                          "data.mix_source=FILE.jsonl or a hub dataset id of general text (read for the KL even with "
                          "data.mix=0), or reg.kl_on=task")
    if h.nproc * h.nnodes > 1:
        raise ConfigError(f"reg.kl_on: {reg.kl_on} runs an extra forward on general rows outside DDP/FSDP's wrapper; "
                          f"run it with hw.nproc=1 (got hw.nproc={h.nproc} x hw.nnodes={h.nnodes}), or reg.kl_on=task")
