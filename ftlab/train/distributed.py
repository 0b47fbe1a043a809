"""Several processes: torchrun launch, the process group, DDP / FSDP2 wrapping, and who writes what.

`ftlab run hw=gpu8_ddp` (any profile with hw.nproc > 1) starts torchrun itself: every rank runs
`python -m ftlab.launch.worker RUN_DIR`, reads the resolved config from the run directory, and never imports Hydra.

Semantics (what makes N processes equal one process with the same global batch):
- every rank draws the same global batch (ftlab.train.batches.Batches is seeded, no RNG per rank) and trains on the rows
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
    root, in place; parameters become DTensors sharded on dim 0.

    hw.precision bf16/fp16: first the trained parameters become float32 masters (ftlab.train.precision; the wrappers
    fix their dtypes), and FSDP2 gets a MixedPrecisionPolicy (`fsdp_options`): it all-gathers the shards in the half
    type for compute and reduces gradients in float32, the sharded masters and optimizer state stay float32."""
    rank, size, local = world()
    if size == 1:
        return model
    from ftlab.train.precision import to_master

    to_master([p for p in model.parameters() if p.requires_grad], hw.precision)
    if hw.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        from ftlab.models.structure import model_device

        dev = model_device(model)
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ftlab.models.structure import decoder_layers, model_device

    mesh = init_device_mesh(model_device(model).type, (size,))
    options = fsdp_options(hw.precision)
    for block in decoder_layers(model)[1]:
        fully_shard(block, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    return model


def fsdp_options(precision: str) -> dict:
    """fully_shard's keyword arguments for hw.precision: under bf16/fp16 a MixedPrecisionPolicy (parameters
    all-gathered in that type for the forward and backward, gradients reduce-scattered in float32); none under fp32."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return {}
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return {"mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)}


def full_tensor(t):
    """A DTensor's whole value (a collective: every rank calls it); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def is_sharded(model) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


