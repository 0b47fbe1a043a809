"""Errors the training loop raises on purpose, and how a run explains an allocator failure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ftlab.config.schema import RunConfig


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the run stops before the optimizer step, and nothing is saved."""


def out_of_memory_message(e: BaseException, cfg: "RunConfig") -> str | None:
    """An allocator failure (CUDA OOM, or the CPU allocator's), said with the hw knobs that lower memory; None for
    anything else. Checkpoints are written whole or not at all, so nothing partial is left behind."""
    import torch

    text = str(e)
    if not (isinstance(e, torch.OutOfMemoryError) or isinstance(e, MemoryError)
            or (isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text))):
        return None
    hw, t = cfg.hw, cfg.train
    procs = hw.nproc * hw.nnodes
    share = t.batch_size // procs
    knobs = [f"hw.micro_batch_size={max(1, (hw.micro_batch_size or share) // 2)} (now "
             f"{hw.micro_batch_size or f'unset: {share} rows per forward'}; the global batch stays {t.batch_size})"]
    if not hw.grad_checkpointing:
        knobs.append("hw.grad_checkpointing=true")
    if hw.precision == "fp32" and hw.device != "cpu":
        knobs.append("hw.precision=bf16")
    if hw.strategy != "fsdp" and procs > 1:
        knobs.append("hw.strategy=fsdp")
    knobs.append(f"model.max_length below {cfg.model.max_length}")
    first = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
    return f"out of memory ({type(e).__name__}: {first}); lower memory with " + ", ".join(knobs)
