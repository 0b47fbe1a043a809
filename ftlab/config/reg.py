"""The `reg` config group: a regulariser added to the training loss, composable with any method, and the registry
of regularisers (filled beside their code in ftlab.train.regularisers, which imports torch only where it is used)."""

from __future__ import annotations

from dataclasses import dataclass

from ftlab.config.registry import ConfigError, Registry


@dataclass
class RegConfig:
    """A regulariser added to the training loss, composable with any method (config group `reg`)."""

    kind: str = "none"  # none | kl (KL to the frozen base on the batch) | l2sp (L2 pull to the start weights)
    weight: float = 0.0


# kind -> the Regulariser class, registered beside its code in ftlab.train.regularisers (torch-free at import).
REGULARISERS: Registry = Registry("regulariser", "reg.kind", discover="ftlab.train.regularisers")


def check_reg(reg: RegConfig) -> None:
    """Range checks of the reg group (its kind is a registered regulariser)."""
    REGULARISERS.check(reg.kind)
    if not (isinstance(reg.weight, (int, float)) and reg.weight >= 0):
        raise ConfigError(f"reg.weight: must be >= 0, got {reg.weight!r}")
    if reg.kind != "none" and reg.weight == 0:
        raise ConfigError(f"reg.weight: reg.kind={reg.kind} needs a weight > 0 (e.g. reg.weight=0.1), got 0")
