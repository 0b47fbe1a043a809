"""Mixed precision: half-precision compute, float32 master weights.

Under hw.precision=bf16 (or fp16) the forward runs under `torch.autocast` in that dtype (ftlab.train.loop.autocast).
The weights the optimizer updates must not be stored in it: AdamW's update of a weight is ~lr, far below a bfloat16
weight's spacing (2^-8 of its size), so a bf16-stored model loaded with model.dtype=bfloat16 barely moves (measured
before this module: 0.7% of the weights changed in 3 steps at lr 1e-5, 100% in float32). So, for training:

- `to_master(params)`: every trained parameter stored in a half type is upcast to float32 in place (the same
  Parameter object, so methods, optimizers and checkpoints see the same parameters); AdamW's state follows in
  float32. Frozen weights keep their dtype (a LoRA base stays bfloat16; peft keeps its adapters in float32).
- `to_storage(model)`: after training, the upcast parameters go back to the dtype they were loaded in, so the tuned
  model is evaluated and exported in the same dtype as the base (the comparison stays like for like). Training-state
  checkpoints, written during training, hold the float32 masters: a resume continues from them exactly.

The loop does both for one process. Several processes: ftlab.train.distributed.wrap upcasts before DDP/FSDP2 wrap
the model (FSDP2 then casts to bf16 for compute itself: its MixedPrecisionPolicy), and the loop puts a DDP model back
at the end; FSDP2's trained state is gathered into a freshly loaded model by the pipeline.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["HALF", "half_dtype", "to_master", "to_storage"]

HALF = (torch.bfloat16, torch.float16)
_MARK = "_ftlab_storage_dtype"  # set on an upcast Parameter: the dtype it goes back to


def half_dtype(precision: str):
    """The autocast dtype of hw.precision; None for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def to_master(params: Iterable[torch.Tensor], precision: str) -> int:
    """Upcast, in place, the half-precision parameters among `params` to float32 when `precision` is a half type.
    Returns how many were upcast (0 under fp32, or when they already are float32)."""
    if half_dtype(precision) is None:
        return 0
    n = 0
    seen: set[int] = set()
    for p in params:
        if id(p) in seen or p.dtype not in HALF or hasattr(p, "full_tensor"):  # DTensors: FSDP2 shards as given
            continue
        seen.add(id(p))
        with torch.no_grad():
            setattr(p, _MARK, p.dtype)
            p.data = p.data.float()
        n += 1
    return n


def to_storage(model: nn.Module) -> int:
    """Cast every parameter `to_master` upcast back to its stored dtype; returns how many."""
    n = 0
    for p in model.parameters():
        dtype = getattr(p, _MARK, None)
        if dtype is None or hasattr(p, "full_tensor"):
            continue
        with torch.no_grad():
            p.data = p.data.to(dtype)
            if p.grad is not None:
                p.grad = None
        delattr(p, _MARK)
        n += 1
    return n
