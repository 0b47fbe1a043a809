"""The one decision "in this process or through torchrun", shared by `ftlab run` and the SLURM job side.

A config that asks for one process (hw.nproc x hw.nnodes == 1), or a process that already is a torchrun rank,
runs the pipeline here (ftlab.pipeline.run_from_dir). Several processes are started by torchrun on this node,
each rank running `python -m ftlab.launch.worker RUN_DIR` on the frozen config.yaml; this process waits.
"""

from __future__ import annotations

from pathlib import Path

from ftlab.launch import torchrun
from ftlab.train import distributed, preempt


def processes(hw) -> int:
    return hw.nproc * hw.nnodes


def needs_torchrun(hw) -> bool:
    return processes(hw) > 1 and distributed.world()[1] == 1


def refusal(hw) -> str | None:
    """Why this node cannot run the config at all (a CUDA profile without enough GPUs), checked before the run
    directory exists and before torchrun starts N processes that would all fail; None when it can."""
    return torchrun.missing_gpus(hw) if distributed.world()[1] == 1 else None


def execute(run_dir: Path, hw) -> str | None:
    """Run `run_dir` here or through torchrun. None when it completed; otherwise why not (result.json says
    more). A stop signal (ftlab.train.preempt.Preempted) propagates to the caller."""
    from ftlab.pipeline import RunFailed, run_from_dir
    from ftlab.rundir.layout import completed_record

    if not needs_torchrun(hw):
        try:
            run_from_dir(run_dir)
        except RunFailed as e:
            return str(e)
        return None
    with preempt.deferred():  # under SLURM the ranks checkpoint at their step end; this process waits
        code = torchrun.launch(run_dir, hw)
    if code == 0 and completed_record(run_dir) is not None:
        return None
    return f"torchrun exit {code}"
