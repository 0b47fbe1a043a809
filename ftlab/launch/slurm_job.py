"""SLURM jobs for `ftlab run` with hw=slurm_*: Hydra's submitit launcher, made to return at once and to survive
preemption.

Submit side (`ftlab run -m ... hw=slurm_cpu`): ftlab.cli.run picks `hydra/launcher=ftlab_slurm`, whose settings
are interpolated from hw.slurm. `SlurmLauncher.launch` writes each job's run directory (named by its config,
ftlab.rundir.identity) with its config.yaml, skips jobs whose run already completed or is queued or running under
another SLURM job, submits the rest as one sbatch array, prints job ids and run directories, and returns without
waiting (the stock launcher blocks until every job ends).

Job side (`Job`, run by submitit inside the allocation): the run from the config.yaml written at submission
(no Hydra in the job). Stop signals go to ftlab.train.preempt: USR2, which SLURM sends `signal_lead_s` before the time
limit and on preemption, and TERM, which `scancel`, `scontrol requeue`, the time limit and a preemption without
grace time send. (submitit's own handler would checkpoint and exit from inside the signal handler, mid-step.)
The training loop checkpoints at the end of the step and raises Preempted; here that becomes
  - USR2 only: `scontrol requeue` of this job, unless it has already been restarted hw.slurm.max_requeues times
    (SLURM_RESTART_COUNT), in which case the run is recorded as failed, saying so;
  - TERM: a clean exit; SLURM itself requeues a job it preempts or that `scontrol requeue` names.
The requeued job runs the same run directory; the pipeline finds its newest complete checkpoint and continues
exactly (ftlab.pipeline). Every submission, start, stop and end is appended to RUN_DIR/slurm.jsonl.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ftlab.rundir.record import RunRecord

EVENTS = "slurm.jsonl"


# --------------------------------------------------------------------------------------------------- helpers
def append_event(run_dir: Path, **event: Any) -> None:
    """One line per submission, start and stop of the run's SLURM jobs (O_APPEND: whole lines)."""
    event = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **event}
    with open(Path(run_dir) / EVENTS, "a") as f:
        f.write(json.dumps(event) + "\n")


def read_events(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / EVENTS
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _status(run_dir: Path) -> Optional[str]:
    return RunRecord.read(run_dir).status


# -------------------------------------------------------------------------------------------------- launcher


# ------------------------------------------------------------------------------------------------- job side
@dataclass(frozen=True)
class SlurmEnv:
    """What the job needs of its SLURM environment, read from the variables SLURM sets (as submitit's
    JobEnvironment reads them; submitit itself stays out of ftlab's job code)."""

    job_id: str  # "<array job>_<task>" for an array task, else the job id (what squeue and scontrol take)
    raw_job_id: str
    global_rank: int
    hostname: str
    nodelist: str
    USR_SIG: str = "USR2"  # the signal SLURM sends signal_lead_s before the time limit (submitit's default)

    @classmethod
    def from_environ(cls) -> "SlurmEnv":
        e = os.environ
        raw = e.get("SLURM_JOB_ID", "")
        array, task = e.get("SLURM_ARRAY_JOB_ID"), e.get("SLURM_ARRAY_TASK_ID")
        return cls(job_id=f"{array}_{task}" if array and task else raw, raw_job_id=raw,
                   global_rank=int(e.get("SLURM_PROCID", "0") or 0),
                   hostname=e.get("SLURMD_NODENAME") or socket.gethostname(), nodelist=e.get("SLURM_JOB_NODELIST", ""),
                   USR_SIG=e.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))

    @property
    def hostnames(self) -> list[str]:
        """The allocation's nodes, in order (`scontrol show hostnames`)."""
        out = subprocess.run(["scontrol", "show", "hostnames", self.nodelist], capture_output=True, text=True,
                             check=True, timeout=60).stdout
        return out.split() or [self.hostname]


class Job:
    """What each SLURM array task runs (submitit pickles it by reference): the run in `run_dir`, from the
    config.yaml written there at submission. No Hydra and no recomposition inside the job, so a requeued job
    runs the config it was submitted with even if conf/ changed since (workers never import Hydra)."""

    def __call__(self, run_dir: str) -> Optional[str]:
        from ftlab.config.files import load_run_config
        from ftlab.train import preempt

        run_dir = Path(run_dir)
        env = SlurmEnv.from_environ()
        run = load_run_config(run_dir)
        # ours instead of submitit's (which checkpoints from inside the handler, mid-step)
        preempt.install((env.USR_SIG, "TERM"), save_on_signal=run.hw.slurm.save_on_signal)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        lead = env.global_rank == 0  # one task per node; the first one records and decides
        if lead:
            append_event(run_dir, event="start", job_id=env.job_id, restart=restarts, host=env.hostname)
        try:
            status = _run(run_dir, run, env)
        except preempt.Preempted as p:
            if not lead:
                sys.exit(0)
            _stopped(p, env, restarts, run_dir, run.hw.slurm.max_requeues)
        if lead:
            append_event(run_dir, event="end", job_id=env.job_id, restart=restarts, status=status)
        if status != "completed":  # the SLURM job ends FAILED; result.json says why
            raise RuntimeError(f"run {status}: {run_dir / 'result.json'}")
        return status


def _run(run_dir: Path, run, env) -> Optional[str]:
    """The run, here or through torchrun (ftlab.launch.start, the same decision as `ftlab run`); its status."""
    from ftlab.launch.start import execute, processes
    from ftlab.train import preempt

    if run.hw.nnodes > 1:
        # torchrun's rendezvous on the job's first node, at a port derived from the job id
        os.environ.setdefault("MASTER_ADDR", env.hostnames[0])
        os.environ.setdefault("MASTER_PORT", str(20000 + int(env.raw_job_id) % 20000))
    execute(run_dir, run.hw)  # a failure is recorded in result.json; the status below says it
    status = _status(run_dir)
    got = preempt.requested()
    if processes(run.hw) > 1 and (status == "preempted" or (status == "running" and got)):
        info = RunRecord.read(run_dir).data.get("preempted") or {}
        raise preempt.Preempted(info.get("signals") or got, step=info.get("step"), run_dir=run_dir,
                                checkpoint=info.get("checkpoint"))
    return status


def decide(signals: list[str], restarts: int, max_requeues: int) -> str:
    """What a stopped job does: 'exit' on TERM (scancel, scontrol requeue, the time limit or a preemption:
    SLURM ends the job itself and requeues it when asked to), else 'requeue' while SLURM_RESTART_COUNT is below
    hw.slurm.max_requeues, then 'fail'."""
    if "TERM" in signals:
        return "exit"
    return "requeue" if restarts < max_requeues else "fail"


def _stopped(p, env, restarts: int, run_dir: Path, max_requeues: int):
    action = decide(p.signals, restarts, max_requeues)
    append_event(run_dir, event="stop", job_id=env.job_id, restart=restarts, signals=p.signals, step=p.step,
                 checkpoint=p.checkpoint, action=action)
    if action == "fail":
        msg = (f"stopped by {'+'.join(p.signals)} after {restarts} requeue(s); hw.slurm.max_requeues="
               f"{max_requeues} reached, so the job did not requeue itself again. Its newest checkpoint "
               f"({p.checkpoint or 'see checkpoints/'}) is kept: resubmit the same command to continue from "
               "it (raise hw.slurm.time_min if the time limit keeps stopping it)")
        rec = RunRecord.read(run_dir)
        if rec.status != "completed":
            rec.fail(f"Preempted: {msg}")
        print(f"ftlab: run failed: {msg}", file=sys.stderr, flush=True)
        raise RuntimeError(msg)  # submitit records the error; the SLURM job ends FAILED
    if action == "requeue":
        print(f"ftlab: {p}; requeueing job {env.job_id} (restart {restarts + 1} of at most {max_requeues})",
              file=sys.stderr, flush=True)
        # SLURM kills this job as part of the requeue; the checkpoint is already complete on disk
        subprocess.run(["scontrol", "requeue", env.job_id], check=False, timeout=60)
    else:
        print(f"ftlab: {p}; exiting, SLURM decides whether the job runs again", file=sys.stderr, flush=True)
    sys.exit(143 if action == "exit" else 0)  # SystemExit: submitit writes no result, the job is not done
