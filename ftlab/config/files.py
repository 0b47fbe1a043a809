"""The config on disk: where conf/ is, and the frozen config.yaml of a run directory (read by workers)."""

from __future__ import annotations

from pathlib import Path

import yaml

from ftlab.config.schema import RunConfig
from ftlab.config.validate import from_container

CONFIG = "config.yaml"  # the frozen, resolved config in every run directory; workers read only this


def load_run_config(run_dir: Path) -> RunConfig:
    with open(Path(run_dir) / CONFIG) as f:
        return from_container(yaml.safe_load(f))
