"""`ftlab report --wandb`: the comparison's tables and plots as one wandb run of their own (job_type "report"),
beside the training runs that ftlab.report.loggers.WandbLogger writes.

Offline unless WANDB_MODE says otherwise, as a run's logger: a report is often made on a login node or laptop
without credentials, and `wandb sync <dir>` uploads it later. The API key, entity and base URL are wandb's to read
from the environment (WANDB_API_KEY, WANDB_ENTITY, WANDB_BASE_URL); nothing here takes or stores a secret."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ftlab.report.html import PNG_MAGIC

_MODES = ("offline", "online", "disabled", "shared")


def _mode() -> str:
    mode = os.environ.get("WANDB_MODE", "").strip() or "offline"
    if mode == "dryrun":  # wandb's older spelling of offline
        mode = "offline"
    if mode not in _MODES:
        raise ValueError(f"WANDB_MODE={mode!r}: give one of {', '.join(_MODES)} (unset means offline)")
    return mode


def log_report(tables: dict[str, tuple[Sequence[str], Sequence[Sequence[Any]]]], images: dict[str, bytes], *,
               project: str = "ftlab-report", name: str | None = None, dir: str | os.PathLike | None = None) -> str:
    """Log `tables` ({name: (columns, rows)}) as wandb.Table and `images` ({name: png_bytes}) as wandb.Image, in
    one step of a new run; return its local directory (the offline-run-*/run-* folder holding the .wandb file and
    files/media/), or "" under WANDB_MODE=disabled, which writes nothing. `dir` is wandb's dir (default: WANDB_DIR,
    else the working directory)."""
    for key, png in images.items():
        if not isinstance(png, (bytes, bytearray)) or bytes(png[:8]) != PNG_MAGIC:
            raise ValueError(f"log_report: images[{key!r}] is not PNG bytes (pass what ftlab.report.plots returns)")
    for key, tc in tables.items():
        if not isinstance(tc, (tuple, list)) or len(tc) != 2:
            raise ValueError(f"log_report: tables[{key!r}] must be (columns, rows)")
        columns, rows = tc
        for i, row in enumerate(rows):
            if len(row) != len(columns):
                raise ValueError(f"log_report: tables[{key!r}] row {i} has {len(row)} cells for {len(columns)} "
                                 f"columns")
    mode = _mode()
    if mode == "disabled":  # wandb switched off for this environment: nothing is written, no directory to give
        return ""
    import wandb

    if dir is not None:
        Path(dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, name=name, mode=mode, dir=str(dir) if dir is not None else None,
                     job_type="report", tags=["ftlab-report"], reinit="finish_previous",
                     settings=wandb.Settings(silent=True))
    try:
        with tempfile.TemporaryDirectory(prefix="ftlab-report-") as tmp:
            row: dict[str, Any] = {}
            for key, (columns, rows) in tables.items():
                # report tables mix numbers with "-" for not measured in one column
                row[key] = wandb.Table(columns=[str(c) for c in columns], data=[list(r) for r in rows],
                                       allow_mixed_types=True)
            for k, (key, png) in enumerate(images.items()):
                # from the file, not a decoded array: wandb copies these exact bytes into the run's media
                path = Path(tmp) / f"{k:03d}.png"
                path.write_bytes(bytes(png))
                row[key] = wandb.Image(str(path), caption=key)
            run.log(row)
            run_dir = _local_dir(run)
            run.finish()
    except BaseException:
        run.finish(exit_code=1)
        raise
    return run_dir


def _local_dir(run: Any) -> str:
    sync_dir = getattr(getattr(run, "settings", None), "sync_dir", None)
    if sync_dir:
        return str(sync_dir)
    return str(Path(run.dir).parent)  # run.dir is <run directory>/files
