"""The run record: result.json (written atomically), per-item eval records, the training curve.

Field names are a contract (DESIGN section 5): readers such as `ftlab report` and the tests rely on them.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from ftlab.rundir.identity import hub_inputs, input_digests
from ftlab.utils.files import atomic_write_json

RESULT = "result.json"
CURVE = "metrics.jsonl"
RECORDS = "records"  # records/<base|tuned>/<task>.jsonl, one row per example


def git_info() -> tuple[str | None, bool | None]:
    """The ftlab checkout's commit and whether it had uncommitted changes (None outside a git checkout)."""
    src = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip() != ""
        return sha, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def env_info(device: str, world_size: int = 1) -> dict:
    import peft
    import torch
    import transformers

    from ftlab import __version__

    sha, dirty = git_info()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "ftlab": __version__,
        "git_sha": sha,
        "git_dirty": dirty,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "world_size": world_size,
        "hostname": platform.node(),
    }


class RunRecord:
    """result.json of one run, kept in memory and rewritten atomically on every change. The only writer of
    result.json: the pipeline (start, updates, completion or failure) and the SLURM job side (a run that ran
    out of requeues) both go through it."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RESULT
        self.data: dict[str, Any] = {}

    @classmethod
    def read(cls, run_dir: Path) -> "RunRecord":
        """The record on disk ({} when there is none yet, or it cannot be read)."""
        rec = cls(run_dir)
        try:
            rec.data = json.loads(rec.path.read_text())
        except (OSError, ValueError):
            rec.data = {}
        return rec

    @property
    def status(self) -> str | None:
        return self.data.get("status")

    def start(self, run_id: str, config: dict, env: dict) -> None:
        self.data = {
            "run_id": run_id,
            "status": "running",
            "error": None,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "finished_at": None,
            "method": config["method"]["name"],
            "data": config["data"]["name"],
            "model": config["model"]["name"],
            "seed": config["seed"],
            "summary": {},
            "tasks": {},
            "train": {},
            "env": env,
            # sha256 of every input file and what the hub data is pinned to (ftlab.rundir.identity): a completed
            # run whose files changed since is not returned as done
            "inputs": {**input_digests(config), **hub_inputs(config)},
        }
        self.flush()

    def note_train_rows(self, rows: list[dict]) -> None:
        """`inputs.data.rows`: how many training rows the run read and a sha256 of their text (prompt, response,
        reference, in order): the fingerprint of hub data, whose content no config key pins."""
        text = json.dumps([[r.get("prompt"), r.get("response"), r.get("reference")] for r in rows],
                          ensure_ascii=False)
        inputs = dict(self.data.get("inputs") or {})
        inputs["data.rows"] = {"n": len(rows), "sha256": hashlib.sha256(text.encode()).hexdigest()}
        self.update(inputs=inputs)

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.flush()

    def complete(self) -> None:
        self.update(status="completed", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def fail(self, error: str) -> None:
        self.update(status="failed", error=error, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def flush(self) -> None:
        atomic_write_json(self.path, self.data)
