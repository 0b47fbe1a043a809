"""Stop signals of scheduled jobs (SLURM preemption, time limit, requeue) turned into a checkpoint at a step boundary.

A signal handler that saves or exits by itself can cut a step or a checkpoint in half (Lightning #21406). Here
the handler only records the signal while the training loop runs (`deferred()`); the loop asks `requested()` at
the end of every optimizer step, writes a training-state checkpoint there and raises `Preempted`, which the SLURM
job wrapper (ftlab.launch.slurm_job) turns into a requeue or a clean exit. Outside the training loop (model loading, the base
or tuned evaluation) there is no step to finish: the handler raises `Preempted` at once and the run continues
from its newest checkpoint when the job starts again.

Nothing here runs unless `install()` was called (ftlab.launch.slurm_job does, inside SLURM jobs): a plain `ftlab run` keeps
Python's default handlers. Pure Python; torch only when a distributed group is up.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Iterator, Optional

# Children (torchrun workers) re-install the same handlers from this variable: install_from_env().
ENV = "FTLAB_STOP_SIGNALS"

_state = {"installed": (), "save": True, "defer": 0, "got": [], "raised": False}


class Preempted(BaseException):
    """The job was told to stop. A BaseException, so that nothing between the training loop and the SLURM job
    wrapper (Hydra's run_job catches Exception) mistakes it for a failed run."""

    def __init__(self, signals: list[str], step: Optional[int] = None, run_dir: Optional[Path] = None,
                 checkpoint: Optional[str] = None):
        self.signals, self.step, self.run_dir, self.checkpoint = list(signals), step, run_dir, checkpoint
        _state["raised"] = True  # from here on, further signals are only recorded
        where = f" after step {step}" if step is not None else " outside the training loop"
        saved = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"stopped by {'+'.join(self.signals)}{where}{saved}")

    @property
    def info(self) -> dict:
        return {"signals": self.signals, "step": self.step, "checkpoint": self.checkpoint}


def install(signals: tuple[str, ...] = ("USR2", "TERM"), save_on_signal: bool = True) -> None:
    """Handle these signals (names without SIG): record them; act at the next step end of the training loop when
    `save_on_signal`, else at once. Exported in FTLAB_STOP_SIGNALS for child processes."""
    for name in signals:
        signal.signal(getattr(signal, "SIG" + name), _handler)
    _state.update(installed=tuple(signals), save=save_on_signal, got=[], raised=False)
    os.environ[ENV] = ",".join(signals) + ("" if save_on_signal else ":nosave")


def install_from_env() -> bool:
    """In a child process (e.g. a torchrun worker) of a job that called install(): the same handlers."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    names, _, flag = spec.partition(":")
    install(tuple(n for n in names.split(",") if n), save_on_signal=flag != "nosave")
    return True


def child_preexec() -> None:
    """preexec_fn for a launcher process between this job and its workers (torchrun's agent): ignore the stop
    signals there (SLURM signals every process of the step; the agent would die of USR2, taking the workers with
    it). Workers inherit the ignore and replace it with install_from_env()."""
    for name in (os.environ.get(ENV) or "").partition(":")[0].split(","):
        if name and name != "TERM":  # the agent forwards TERM to its workers itself
            signal.signal(getattr(signal, "SIG" + name), signal.SIG_IGN)


def installed() -> bool:
    return bool(_state["installed"])


def _handler(signum: int, frame) -> None:
    name = signal.Signals(signum).name.removeprefix("SIG")
    if name not in _state["got"]:
        _state["got"].append(name)
    if _state["raised"]:
        return  # already stopping: let the record and checkpoint writes finish
    if _state["defer"] and _state["save"]:
        return  # the training loop checkpoints at the end of this step (requested())
    raise Preempted(list(_state["got"]))


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """While inside: a stop signal waits for the loop's next requested() check instead of raising."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1


def requested() -> list[str]:
    """The stop signals received so far (empty: keep training). In a distributed run every rank calls this at
    every step end and they agree (any rank signalled -> all stop at the same step), so the checkpoint's
    collectives line up."""
    got = list(_state["got"]) if _state["save"] else []
    if _state["installed"]:
        got = _agree(got)
    return got


def _agree(got: list[str]) -> list[str]:
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return got
    import torch

    flag = torch.tensor([1 if got else 0, 1 if "TERM" in got else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag[0]):
        return []
    return got or (["TERM"] if int(flag[1]) else ["USR2"])


def uninstall() -> None:
    """Python's default handlers back, nothing recorded (tests; a process that runs on after a job)."""
    for name in _state["installed"]:
        signal.signal(getattr(signal, "SIG" + name), signal.SIG_DFL)
    _state.update(installed=(), save=True, got=[], raised=False)
    os.environ.pop(ENV, None)
