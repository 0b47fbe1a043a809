"""SLURM jobs for `ftlab run` with hw=slurm_*: Hydra's submitit launcher, made to return at once and to survive
preemption.

Submit side (`ftlab run -m ... hw=slurm_cpu`): ftlab.cli picks `hydra/launcher=ftlab_slurm`, whose settings
are interpolated from hw.slurm. `SlurmLauncher.launch` writes each job's run directory (named by its config,
ftlab.identity) with its config.yaml, skips jobs whose run already completed or is queued or running under
another SLURM job, submits the rest as one sbatch array, prints job ids and run directories, and returns without
waiting (the stock launcher blocks until every job ends).

Job side (`Job`, run by submitit inside the allocation): the run from the config.yaml written at submission
(no Hydra in the job). Stop signals go to ftlab.preempt: USR2, which SLURM sends `signal_lead_s` before the time
limit and on preemption, and TERM, which `scancel`, `scontrol requeue`, the time limit and a preemption without
grace time send. (submitit's own handler would checkpoint and exit from inside the signal handler, mid-step.)
The training loop checkpoints at the end of the step and raises Preempted; here that becomes
  - USR2 only: `scontrol requeue` of this job, unless it has already been restarted hw.slurm.max_requeues times
    (SLURM_RESTART_COUNT), in which case the run is recorded as failed, saying so;
  - TERM: a clean exit; SLURM itself requeues a job it preempts or that `scontrol requeue` names.
The requeued job runs the same run directory; the runner finds its newest complete checkpoint and continues
exactly (ftlab.runner). Every submission, start, stop and end is appended to RUN_DIR/slurm.jsonl.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _HydraSlurmLauncher

EVENTS = "slurm.jsonl"
LAUNCHER = "ftlab_slurm"
_LIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
         "SUSPENDED", "STOPPED", "SIGNALING"}


@dataclass
class FtlabSlurmQueueConf(SlurmQueueConf):
    """hydra/launcher=ftlab_slurm: the stock submitit_slurm settings, each read from hw.slurm."""

    _target_: str = "hydra_plugins.ftlab_slurm_launcher.SlurmLauncher"
    submitit_folder: str = "${out_dir}/slurm/%j"
    name: str = "ftlab"
    partition: Optional[str] = "${hw.slurm.partition}"
    account: Optional[str] = "${hw.slurm.account}"
    qos: Optional[str] = "${hw.slurm.qos}"
    constraint: Optional[str] = "${hw.slurm.constraint}"
    nodes: int = "${hw.nnodes}"  # type: ignore[assignment]
    gpus_per_node: Optional[int] = "${hw.slurm.gpus_per_node}"  # type: ignore[assignment]
    cpus_per_task: Optional[int] = "${hw.slurm.cpus_per_task}"  # type: ignore[assignment]
    mem_gb: Optional[int] = "${hw.slurm.mem_gb}"  # type: ignore[assignment]
    timeout_min: int = "${hw.slurm.time_min}"  # type: ignore[assignment]
    signal_delay_s: int = "${hw.slurm.signal_lead_s}"  # type: ignore[assignment]
    # submitit's own timeout countdown; ftlab's handler decides requeues itself (max_requeues), this only keeps
    # submitit from refusing one
    max_num_timeout: int = "${hw.slurm.max_requeues}"  # type: ignore[assignment]
    array_parallelism: int = "${hw.slurm.array_parallelism}"  # type: ignore[assignment]
    setup: Optional[list[str]] = "${hw.slurm.setup}"  # type: ignore[assignment]
    additional_parameters: dict[str, Any] = "${hw.slurm.additional}"  # type: ignore[assignment]


def register_launcher() -> None:
    """hydra/launcher=ftlab_slurm, and its class known to Hydra (plugin discovery does not scan an editable
    install)."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    from hydra_plugins.ftlab_slurm_launcher import SlurmLauncher

    ConfigStore.instance().store(group="hydra/launcher", name=LAUNCHER, node=FtlabSlurmQueueConf,
                                 provider="ftlab")
    Plugins.instance().register(SlurmLauncher)


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


def _expand(job_id: str) -> list[str]:
    """squeue ids: '12', '12_3', and pending array ranges '12_[0-3,5%2]' -> each task id."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def live_jobs() -> dict[str, str]:
    """Job id -> state of every job this cluster still holds that has not ended."""
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i|%T"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"squeue failed ({e}); is SLURM_CONF set to a running cluster? "
                           "(scripts/slurm_cluster.sh up prints it)") from None
    jobs = {}
    for line in out.splitlines():
        jid, _, state = line.strip().partition("|")
        if state in _LIVE:
            for j in _expand(jid):
                jobs[j] = state
    return jobs


def _job_run_dir(hydra_context, master_config, overrides: Sequence[str], job_num: int):
    """The job's config as Hydra will compose it in the allocation, and its run directory (as run_job computes
    it: hydra.sweep.dir / hydra.sweep.subdir)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    cfg = hydra_context.config_loader.load_sweep_config(master_config, list(overrides))
    with open_dict(cfg.hydra.job):
        cfg.hydra.job.num = job_num
    HydraConfig.instance().set_config(cfg)
    run_dir = Path(str(OmegaConf.select(cfg, "hydra.sweep.dir"))) / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
    return cfg, run_dir.absolute()


def _status(run_dir: Path) -> Optional[str]:
    return _record(run_dir).get("status")


# -------------------------------------------------------------------------------------------------- launcher
class SlurmLauncherBase(_HydraSlurmLauncher):
    """Used as hydra_plugins.ftlab_slurm_launcher.SlurmLauncher."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if not self.params.get("gpus_per_node"):
            self.params["gpus_per_node"] = None  # no --gpus-per-node=0 line: clusters without GRES refuse it
        # requeue-able even where the cluster's JobRequeue=0 (the job requeues itself on USR2)
        self.params["additional_parameters"] = {"requeue": True, **(self.params.get("additional_parameters") or {})}

    # ---------------------------------------------------------------------------------------- submit side
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        import submitit
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import JobReturn, JobStatus, filter_overrides

        from ftlab.identity import ResumeRefused
        from ftlab.runner import completed_record, prepare_run_dir
        from ftlab.schema import validate

        assert self.config is not None and self.hydra_context is not None
        live = live_jobs()
        todo, returns, lines = [], [], []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            cfg, run_dir = _job_run_dir(self.hydra_context, self.config, overrides, idx)
            ret = JobReturn(overrides=list(overrides), cfg=cfg, working_dir=str(run_dir), task_name="ftlab",
                            status=JobStatus.COMPLETED)
            returns.append(ret)
            try:
                prepare_run_dir(run_dir, validate(cfg))
                done = completed_record(run_dir)
            except ResumeRefused as e:
                lines.append(f"  skipped   {run_dir}: {e}")
                continue
            if done is not None:
                lines.append(f"  completed {run_dir} (already; gain {done.get('summary', {}).get('gain')})")
                continue
            queued = [e["job_id"] for e in read_events(run_dir) if e.get("job_id") in live]
            if queued:
                lines.append(f"  queued    {run_dir} (already, as job {queued[-1]}: {live[queued[-1]]})")
                continue
            todo.append((list(overrides), idx, run_dir, ret))
        HydraConfig.instance().set_config(self.config)

        submitted = []
        if todo:
            executor = submitit.AutoExecutor(cluster="slurm", folder=self.params["submitit_folder"],
                                             slurm_max_num_timeout=self.params["max_num_timeout"])
            from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
            from omegaconf import OmegaConf

            base = set(OmegaConf.structured(BaseQueueConf).keys())
            skip = {"submitit_folder", "max_num_timeout"}
            executor.update_parameters(**{k if k in base else f"slurm_{k}": v
                                          for k, v in self.params.items() if k not in skip})
            jobs = executor.map_array(Job(), [str(t[2]) for t in todo])
            for job, (overrides, _idx, run_dir, ret) in zip(jobs, todo):
                append_event(run_dir, event="submitted", job_id=job.job_id,
                             overrides=filter_overrides(overrides))
                ret.return_value = job.job_id
                submitted.append((job, run_dir))
        self._report(submitted, lines)
        return returns

    def _report(self, submitted: list, lines: list[str]) -> None:
        p = self.params
        out = []
        if submitted:
            array = submitted[0][0].job_id.split("_")[0]
            out.append(f"ftlab: submitted {len(submitted)} SLURM job(s) (array {array}; partition "
                       f"{p.get('partition') or 'default'}, {p['timeout_min']} min each; on preemption or "
                       f"time limit a job checkpoints and requeues itself, at most {p['max_num_timeout']} times)")
            out += [f"  {job.job_id:<10}{run_dir}" for job, run_dir in submitted]
        else:
            out.append("ftlab: nothing to submit")
        out += lines
        if submitted:
            folder = p["submitit_folder"].replace("%j", "<job id>")
            out += ["results: <run dir>/result.json (status running / preempted / completed / failed) and",
                    f"         <run dir>/{EVENTS} (every submission, start and stop); job logs: {folder}",
                    f"follow:  squeue -j {array}     resubmit the same command to finish what is missing"]
        print("\n".join(out), flush=True)


# ------------------------------------------------------------------------------------------------- job side
class Job:
    """What each SLURM array task runs (submitit pickles it by reference): the run in `run_dir`, from the
    config.yaml written there at submission. No Hydra and no recomposition inside the job, so a requeued job
    runs the config it was submitted with even if conf/ changed since (workers never import Hydra)."""

    def __call__(self, run_dir: str) -> Optional[str]:
        import submitit

        from ftlab import preempt
        from ftlab.runner import load_run_config

        run_dir = Path(run_dir)
        env = submitit.JobEnvironment()
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
    """The run, in this process or, for several processes, through torchrun (ftlab.dist.launch); its status."""
    from ftlab import dist, preempt
    from ftlab.runner import RunFailed, run_from_dir

    if run.hw.nproc * run.hw.nnodes == 1:
        try:
            run_from_dir(run_dir)
        except RunFailed:
            pass  # recorded in result.json
        return _status(run_dir)
    if run.hw.nnodes > 1:
        # torchrun's rendezvous on the job's first node, at a port derived from the job id
        os.environ.setdefault("MASTER_ADDR", env.hostnames[0])
        os.environ.setdefault("MASTER_PORT", str(20000 + int(env.raw_job_id) % 20000))
    with preempt.deferred():  # the workers checkpoint at their step end; this process waits for torchrun
        dist.launch(run_dir, run.hw)
    status = _status(run_dir)
    got = preempt.requested()
    if status == "preempted" or (status == "running" and got):
        info = _record(run_dir).get("preempted") or {}
        raise preempt.Preempted(info.get("signals") or got, step=info.get("step"), run_dir=run_dir,
                                checkpoint=info.get("checkpoint"))
    return status


def _record(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return {}


def decide(signals: list[str], restarts: int, max_requeues: int) -> str:
    """What a stopped job does: 'exit' on TERM (scancel, scontrol requeue, the time limit or a preemption:
    SLURM ends the job itself and requeues it when asked to), else 'requeue' while SLURM_RESTART_COUNT is below
    hw.slurm.max_requeues, then 'fail'."""
    if "TERM" in signals:
        return "exit"
    return "requeue" if restarts < max_requeues else "fail"


def _stopped(p, env, restarts: int, run_dir: Path, max_requeues: int):
    from ftlab.record import atomic_write_json

    action = decide(p.signals, restarts, max_requeues)
    append_event(run_dir, event="stop", job_id=env.job_id, restart=restarts, signals=p.signals, step=p.step,
                 checkpoint=p.checkpoint, action=action)
    if action == "fail":
        msg = (f"stopped by {'+'.join(p.signals)} after {restarts} requeue(s); hw.slurm.max_requeues="
               f"{max_requeues} reached, so the job did not requeue itself again. Its newest checkpoint "
               f"({p.checkpoint or 'see checkpoints/'}) is kept: resubmit the same command to continue from "
               "it (raise hw.slurm.time_min if the time limit keeps stopping it)")
        rec = _record(run_dir)
        if rec.get("status") != "completed":
            rec.update(status="failed", error=f"Preempted: {msg}", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            atomic_write_json(run_dir / "result.json", rec)
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
