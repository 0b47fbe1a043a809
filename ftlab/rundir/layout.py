"""The run directory on disk: writing its config.yaml (a directory of another config is refused untouched), the
completed record, and the lock that lets one process at a time run it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ftlab.config.files import CONFIG
from ftlab.config.schema import RunConfig, to_container
from ftlab.rundir.record import atomic_write_text


def prepare_run_dir(run_dir: Path, run: RunConfig) -> None:
    """Write run_dir/config.yaml. A directory already holding a different config (out_dir and logger aside) is
    refused, untouched: its record and checkpoints belong to that config."""
    from ftlab.rundir.identity import (
        ResumeRefused,
        config_changes,
        config_digest,
        config_sha256,
    )

    run_dir = Path(run_dir)
    text = yaml.safe_dump(to_container(run), sort_keys=False)
    old = config_sha256(run_dir)
    if old is not None and old != config_digest(to_container(run)):
        changes = config_changes((run_dir / CONFIG).read_text(), text)
        raise ResumeRefused(f"{run_dir} holds a run of a different config ({'; '.join(changes)}); "
                            "start the changed config in a new directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG, text)


def completed_record(run_dir: Path) -> dict | None:
    """result.json of a run that already completed (None otherwise); refused if the config changed since."""
    import json

    from ftlab.rundir.identity import ResumeRefused, config_sha256

    path = run_dir / "result.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("status") != "completed":
        return None
    saved = data.get("config_sha256")
    if saved is not None and saved != config_sha256(run_dir):
        raise ResumeRefused(f"{run_dir}: this run already completed under a different config.yaml "
                            f"(sha256 {saved[:12]}…); start the changed config in a new directory")
    return data


class RunDirBusy(RuntimeError):
    """Another live process is running the same run directory."""
