"""The run directory on disk: writing its config.yaml (a directory of another config is refused untouched), the
completed record, and the lock that lets one process at a time run it.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from ftlab.config.files import CONFIG
from ftlab.config.schema import RunConfig, to_container
from ftlab.rundir.record import RunRecord
from ftlab.utils.files import atomic_write_text


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
    """result.json of a run that already completed (None otherwise); refused if the config or the content of an
    input file (result.json `inputs`, ftlab.rundir.identity.input_digests) changed since."""
    from ftlab.rundir.identity import ResumeRefused, changed_inputs, config_sha256, run_dir_config

    data = RunRecord.read(run_dir).data
    if data.get("status") != "completed":
        return None
    saved = data.get("config_sha256")
    if saved is not None and saved != config_sha256(run_dir):
        raise ResumeRefused(f"{run_dir}: this run already completed under a different config.yaml "
                            f"(sha256 {saved[:12]}…); start the changed config in a new directory")
    changes = changed_inputs(data.get("inputs"), run_dir_config(run_dir) or {})
    if changes:
        raise ResumeRefused(
            f"{run_dir}: this run completed on other content of its input file(s): {'; '.join(changes)}; its record "
            "describes the old content, so it is not returned as done. Run the new content in a new directory "
            "(`ftlab run` names one by the files' content: without hydra.run.dir it picks a new one by itself), or "
            "restore the file(s) to use this record")
    return data


class RunDirBusy(RuntimeError):
    """Another live process is running the same run directory."""


LOCK = ".lock"


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold the run directory for this process: an advisory lock the kernel releases even on SIGKILL. A second
    process gets RunDirBusy at once."""
    import fcntl

    with open(Path(run_dir) / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(f"{run_dir}: another process is running this run directory "
                             f"(holds {Path(run_dir) / LOCK})") from None
        yield
