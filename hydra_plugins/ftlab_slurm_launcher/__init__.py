"""ftlab's SLURM launcher as a Hydra plugin (Hydra instantiates launchers only from the hydra_plugins package):
the submit side of `ftlab run ... hw=slurm_*`. The job side, which never imports Hydra, is ftlab.launch.slurm_job.

`SlurmLauncher.launch` writes each job's run directory (named by its config, ftlab.rundir.identity) with its
config.yaml, skips jobs whose run already completed or is queued or running under another SLURM job, submits the
rest as one sbatch array of `ftlab.launch.slurm_job.Job`, prints job ids and run directories, and returns without
waiting (the stock launcher blocks until every job ends).
"""

# No `from __future__ import annotations` here: Hydra's plugin scan imports this module without registering it in
# sys.modules, where dataclasses cannot resolve string annotations.


import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ftlab.launch.slurm_job import EVENTS, Job, append_event, read_events
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as _HydraSlurmLauncher,
)

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


    ConfigStore.instance().store(group="hydra/launcher", name=LAUNCHER, node=FtlabSlurmQueueConf,
                                 provider="ftlab")
    Plugins.instance().register(SlurmLauncher)


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


class SlurmLauncher(_HydraSlurmLauncher):

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

        from ftlab.config.validate import validate
        from ftlab.rundir.identity import ResumeRefused
        from ftlab.rundir.layout import completed_record, prepare_run_dir

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
            from omegaconf import OmegaConf

            from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

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
