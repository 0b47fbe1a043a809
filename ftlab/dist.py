"""Several processes: torchrun launch, the process group, DDP / FSDP2 wrapping, and who writes what.

`ftlab run hw=gpu8_ddp` (any profile with hw.nproc > 1) starts torchrun itself: every rank runs
`python -m ftlab.worker RUN_DIR`, reads the resolved config from the run directory, and never imports Hydra.

Semantics (what makes N processes equal one process with the same global batch):
- every rank draws the same global batch (ftlab.train.Batches is seeded, no RNG per rank) and trains on the rows
  `rank::world` of it;
- the loss on a rank is its response tokens' summed cross-entropy divided by the GLOBAL count of response tokens,
  times the world size (DDP and FSDP2 average gradients over ranks), so the averaged gradient is the one-process
  gradient up to float summation order;
- rank 0 alone evaluates and writes: result.json, records, the curve, checkpoints (the other ranks' RNG states
  are gathered into it), loggers. Under FSDP2 the trained state is first gathered whole to rank 0; the other
  ranks stop after training.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

STRATEGIES = ("ddp", "fsdp")


def world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) in a plain process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    return world()[0] == 0


def initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init(device: str) -> str:
    """Join the process group (nccl on CUDA, gloo on CPU); returns this rank's device."""
    import torch
    import torch.distributed as dist

    rank, size, local = world()
    if size == 1 or initialized():
        return device
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def shutdown() -> None:
    import torch.distributed as dist

    if initialized():
        dist.destroy_process_group()


def all_sum(x: float) -> float:
    """The sum of a float over ranks (itself in one process)."""
    import torch
    import torch.distributed as dist

    if not initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (one element in one process)."""
    import torch.distributed as dist

    if not initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap(model, hw) -> Any:
    """The module the loop calls forward on. DDP: a wrapper around `model` (parameters stay `model`'s own, so
    methods, checkpoints and exports see the plain module). FSDP2: `fully_shard` on each decoder block and the
    root, in place; parameters become DTensors sharded on dim 0."""
    rank, size, local = world()
    if size == 1:
        return model
    if hw.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = next(model.parameters()).device
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dev = next(model.parameters()).device
    mesh = init_device_mesh(dev.type, (size,))
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def decoder_blocks(model) -> list:
    from ftlab.methods.layers import decoder_layers

    return list(decoder_layers(model)[1])


def full_tensor(t):
    """A DTensor's whole value (a collective: every rank calls it); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def is_sharded(model) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


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
    return cmd + ["-m", "ftlab.worker", str(run_dir)]


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
    from ftlab.preempt import child_preexec

    # in a SLURM job: torchrun's agent ignores USR2 (SLURM signals every process of the step; the workers
    # checkpoint at their step end and exit 3, the agent must not die first)
    return subprocess.run(torchrun_command(run_dir, hw), env=env, preexec_fn=child_preexec).returncode
