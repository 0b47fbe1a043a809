"""Several processes on this node: the torchrun command line, the GPU check before it starts, and the launch.

Every rank runs `python -m ftlab.launch.worker RUN_DIR`, reads the frozen config.yaml there, and never imports
Hydra. What the ranks do together is in ftlab.train.distributed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def torchrun_command(run_dir: Path, hw) -> list[str]:
    """torchrun for this node. One node: --standalone. Several (hw.nnodes > 1, e.g. inside a SLURM allocation):
    a c10d rendezvous at MASTER_ADDR:MASTER_PORT, this node's rank from SLURM_NODEID / NODE_RANK."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={hw.nproc}"]
    if hw.nnodes > 1:
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = os.environ.get("MASTER_PORT", "29500")
        node = os.environ.get("SLURM_NODEID", os.environ.get("NODE_RANK", "0"))
        cmd += [f"--nnodes={hw.nnodes}", f"--node_rank={node}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={addr}:{port}", f"--rdzv_id={Path(run_dir).name}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "ftlab.launch.worker", str(run_dir)]


def missing_gpus(hw) -> str | None:
    """Why this node cannot start hw.nproc CUDA ranks (None when it can, or the profile is not CUDA): said before
    torchrun starts N processes that would each fail the same way."""
    if hw.device != "cuda":
        return None
    import torch

    have = torch.cuda.device_count()
    if have >= hw.nproc:
        return None
    return (f"hw={hw.name} starts hw.nproc={hw.nproc} CUDA processes on this node, but {have} GPU(s) are visible; "
            f"set hw.nproc={have}" if have else f"hw={hw.name} (hw.device=cuda) needs a CUDA GPU and none is visible; "
            "use hw=cpu (or hw=cpu2_ddp for two CPU processes)")


def launch(run_dir: Path, hw) -> int:
    """Run the experiment in run_dir on hw.nproc processes (per node) through torchrun; returns its exit code.
    The workers' result.json says what happened."""
    env = dict(os.environ)
    if hw.device != "cuda":
        # N ranks share the CPU cores: one intra-op thread each unless the profile says otherwise
        # (2 ranks x 2 threads on 2 cores ran ~10x slower than 2 x 1 here).
        env.setdefault("OMP_NUM_THREADS", str(hw.num_threads or max(1, (os.cpu_count() or 1) // hw.nproc)))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    from ftlab.train.preempt import child_preexec

    # in a SLURM job: torchrun's agent ignores USR2 (SLURM signals every process of the step; the workers
    # checkpoint at their step end and exit 3, the agent must not die first)
    return subprocess.run(torchrun_command(run_dir, hw), env=env, preexec_fn=child_preexec).returncode
