"""hw.kernels=true on a CUDA device: Liger-Kernel's RMSNorm, RoPE and SwiGLU in Llama, Qwen2 and Qwen3 models,
when liger_kernel is installed (`pip install ftlab[liger]`). Not run by the CPU test suite: Liger's kernels are
Triton kernels for GPUs.

Liger's own H100 numbers (docs/performance.md, ../shared/research/performance.md §1.3) show its RMSNorm forward +
backward slower than torch's below a hidden size of 8192, so `rms_norm` is taken only from that size up; RoPE and
SwiGLU are faster at every size measured there. Liger's cross-entropy patches are never applied: ftlab computes
the loss itself from the final hidden states (ftlab.models.logits, ftlab.train.batches.response_loss).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

# hidden sizes from which Liger's RMSNorm backward beat torch.nn.RMSNorm on H100 (Liger's benchmark CSV, v0.8)
RMSNORM_FROM_HIDDEN = 8192
_PATCHERS = {"llama": "apply_liger_kernel_to_llama", "qwen2": "apply_liger_kernel_to_qwen2",
             "qwen3": "apply_liger_kernel_to_qwen3"}


def apply_liger(model: nn.Module, device: str) -> Optional[dict]:
    """Patch `model` in place (call before a method wraps it: adapters then wrap the patched modules' linears).
    Returns what was applied ({model_type, rope, rms_norm, swiglu}), or None with the reason printed when nothing
    was (not CUDA, liger_kernel missing, a model type Liger is not wired here for)."""
    import sys

    if not str(device).startswith("cuda"):
        return None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    name = _PATCHERS.get(model_type)
    if name is None:
        print(f"ftlab: hw.kernels: no Liger patch for model type {model_type!r} (only {', '.join(_PATCHERS)}); "
              "running torch's RMSNorm/RoPE/SwiGLU", file=sys.stderr)
        return None
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        print("ftlab: hw.kernels: liger_kernel is not installed (pip install 'ftlab[liger]'); running torch's "
              "RMSNorm/RoPE/SwiGLU", file=sys.stderr)
        return None
    rms = int(getattr(model.config, "hidden_size", 0)) >= RMSNORM_FROM_HIDDEN
    applied = {"model_type": model_type, "rope": True, "rms_norm": rms, "swiglu": True}
    getattr(liger, name)(rope=True, rms_norm=rms, swiglu=True, cross_entropy=False,
                         fused_linear_cross_entropy=False, model=model)
    return applied
