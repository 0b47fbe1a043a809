"""Fused LoRA linear: y = x W^T (+ b) + s (x A^T) B^T, forward and backward in Triton.

peft's LoRA Linear convention: W [out, in] frozen, A [r, in], B [out, r], s = alpha/r (rsLoRA: alpha/sqrt(r)).

Design (why this split):
- Forward is ONE kernel per output tile [BM x BN]: while it streams x's K-blocks for the base GEMM it also multiplies
  them by A^T (the "x @ [W; A]" fusion), so x is read once for both products and x A^T is never a separate pass
  over x; the rank-r product then lands in the same accumulator as the epilogue (+ s (xA^T) B^T, + bias) before the
  one store of y. Every N-tile recomputes its rows' x A^T (r/BN extra FLOPs, small at LoRA ranks) instead of a
  grid-wide sync; the first N-tile stores it (xa, [M, r]) for backward.
- Backward's big product has the same shape: dx = dy W + s (dy B) A is the forward kernel run on dy with W^T in
  W's place, B^T in A's and A^T in B's (strides only, no copies), and it yields dy B as its by-product. The two
  small weight gradients dA = s (dy B)^T x [r, in] and dB = s dy^T xa [out, r] reduce over the tokens: one
  transposed-left GEMM kernel (_tn_kernel) each. LoRAFusion (arXiv:2510.00206) splits the same way: the rank-r
  pieces are memory-bound and ride along the compute-bound base GEMM.
- Accumulation is float32; x A^T is rounded to the input dtype before it meets B^T, as torch's reference does.
  float32 inputs use IEEE dot products (not TF32) so fp32 stays fp32 on GPUs.
- W and bias are frozen: the autograd Function returns no gradient for them, so `lora_linear` sends any call whose
  W or bias requires grad, any dropout > 0 in training, mixed dtypes or an unsupported device to the reference.

Imports nothing from ftlab (tests/test_layering.py). Supported devices: CUDA, or CPU under TRITON_INTERPRET=1
(set before triton is imported; the tests do).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

try:  # triton is optional (the kernels extra); without it every call takes the reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scale: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Plain torch: the definition the kernel is tested against, and its fallback."""
    h = F.dropout(x, dropout, training) if dropout > 0 else x
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(h, lora_a), lora_b)


def kernel_supported(device: torch.device | str) -> bool:
    """Whether the Triton kernels run on this device: CUDA, or CPU in Triton's interpreter."""
    if triton is None:
        return False
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _lora_mm_kernel(X, W, A, B, BIAS, Y, XA, M, N, K, R, scale,
                        sxm, sxk, swn, swk, sar, sak, sbn, sbr, sym, syn, sxam, sxar,
                        HAS_BIAS: tl.constexpr, STORE_XA: tl.constexpr, PRECISION: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        """Y[M, N] = X W^T + scale (X A^T) B^T (+ BIAS); XA = X A^T (in X's dtype) from the first N-tile."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rr = tl.arange(0, BR)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        xa = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            x = tl.load(X + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            wt = tl.load(W + kk[:, None] * swk + rn[None, :] * swn, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
            at = tl.load(A + kk[:, None] * sak + rr[None, :] * sar, mask=(kk[:, None] < K) & (rr[None, :] < R), other=0.0)
            acc = tl.dot(x, wt, acc, input_precision=PRECISION)
            xa = tl.dot(x, at, xa, input_precision=PRECISION)
        xa_in = xa.to(X.dtype.element_ty)  # rounded like torch's intermediate x A^T
        bt = tl.load(B + rr[:, None] * sbr + rn[None, :] * sbn, mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        acc += scale * tl.dot(xa_in, bt, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * sym + rn[None, :] * syn, acc.to(Y.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))
        if STORE_XA:
            if pid_n == 0:
                tl.store(XA + rm[:, None] * sxam + rr[None, :] * sxar, xa_in, mask=(rm[:, None] < M) & (rr[None, :] < R))

    @triton.jit
    def _tn_kernel(U, V, C, M, P, Q, alpha, sum_, sup, svm, svq, scp, scq,
                   PRECISION: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, BM: tl.constexpr):
        """C[P, Q] = alpha U^T V, U [M, P], V [M, Q]: a reduction over the tokens (the LoRA weight gradients)."""
        pid_p = tl.program_id(0)
        pid_q = tl.program_id(1)
        rp = pid_p * BP + tl.arange(0, BP)
        rq = pid_q * BQ + tl.arange(0, BQ)
        rm = tl.arange(0, BM)
        acc = tl.zeros((BP, BQ), dtype=tl.float32)
        for m0 in range(0, M, BM):
            mm = m0 + rm
            ut = tl.load(U + mm[None, :] * sum_ + rp[:, None] * sup, mask=(mm[None, :] < M) & (rp[:, None] < P), other=0.0)
            v = tl.load(V + mm[:, None] * svm + rq[None, :] * svq, mask=(mm[:, None] < M) & (rq[None, :] < Q), other=0.0)
            acc = tl.dot(ut, v, acc, input_precision=PRECISION)
        tl.store(C + rp[:, None] * scp + rq[None, :] * scq, (alpha * acc).to(C.dtype.element_ty),
                 mask=(rp[:, None] < P) & (rq[None, :] < Q))


_GPU_BLOCKS = (64, 64, 32)  # BM, BN, BK: a common Triton GEMM tile; autotuning is the benchmark's job
# The interpreter runs each program of the grid in turn with numpy: few large tiles are what make it fast enough
# for a training run in the tests (measured: 32-wide tiles ~3x slower on the small world). The kernel tests lower
# this to 32 so that several tiles and K-steps (and the masks at their ragged edges) are exercised.
INTERPRET_MAX_BLOCK = 128


def _blocks(device: torch.device, m: int, n: int, k: int) -> tuple[int, int, int]:
    if device.type == "cuda":
        return _GPU_BLOCKS
    return tuple(min(INTERPRET_MAX_BLOCK, max(16, triton.next_power_of_2(d))) for d in (m, n, k))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _lora_mm(x, w, w_strides, a, a_strides, b, b_strides, bias, n, r, scale, want_xa):
    """The forward kernel on x [M, K] with W, A, B given by (tensor, strides in the kernel's [N,K],[R,K],[N,R] view)."""
    m, k = x.shape
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    xa = torch.empty((m, r), device=x.device, dtype=x.dtype) if want_xa else y
    bm, bn, bk = _blocks(x.device, m, n, k)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _lora_mm_kernel[grid](x, w, a, b, bias if bias is not None else y, y, xa, m, n, k, r, float(scale),
                          x.stride(0), x.stride(1), *w_strides, *a_strides, *b_strides, y.stride(0), y.stride(1),
                          xa.stride(0), xa.stride(1),
                          HAS_BIAS=bias is not None, STORE_XA=want_xa, PRECISION=_precision(x.dtype),
                          BM=bm, BN=bn, BK=bk, BR=_rank_block(r))
    return y, (xa if want_xa else None)


def _tn(u, v, alpha):
    """alpha u^T v, u [M, P], v [M, Q]."""
    m, p = u.shape
    q = v.shape[1]
    c = torch.empty((p, q), device=u.device, dtype=u.dtype)
    bp, bq, bm = _blocks(u.device, p, q, m)
    bp, bq = (_rank_block(p) if p <= 64 else bp), (_rank_block(q) if q <= 64 else bq)  # the rank side in one tile
    _tn_kernel[(triton.cdiv(p, bp), triton.cdiv(q, bq))](u, v, c, m, p, q, float(alpha), u.stride(0), u.stride(1),
                                                          v.stride(0), v.stride(1), c.stride(0), c.stride(1),
                                                          PRECISION=_precision(u.dtype), BP=bp, BQ=bq, BM=bm)
    return c


class LoraLinearFunction(torch.autograd.Function):
    """x2d [M, in] -> [M, out]; gradients for x, A and B (W and bias are frozen: None)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        n, r = weight.shape[0], lora_a.shape[0]
        y, xa = _lora_mm(x, weight, (weight.stride(0), weight.stride(1)), lora_a, (lora_a.stride(0), lora_a.stride(1)),
                         lora_b, (lora_b.stride(0), lora_b.stride(1)), bias, n, r, scale, want_xa=True)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        s = ctx.scale
        dy = dy.contiguous()
        k, r = weight.shape[1], lora_a.shape[0]
        # dx = dy W + s (dy B) A: the forward kernel with W^T [in, out], B^T [r, out], A^T [in, r] as its W, A, B
        if ctx.needs_input_grad[0]:
            dx, dyb = _lora_mm(dy, weight, (weight.stride(1), weight.stride(0)), lora_b,
                               (lora_b.stride(1), lora_b.stride(0)), lora_a, (lora_a.stride(1), lora_a.stride(0)), None,
                               k, r, s, want_xa=True)
        else:  # x is a constant (the first layer over frozen embeddings): skip the dy W GEMM, dA needs dy B only
            dx, dyb = None, dy @ lora_b
        d_a = _tn(dyb, x, s) if ctx.needs_input_grad[3] else None  # s (dy B)^T x  [r, in]
        d_b = _tn(dy, xa, s) if ctx.needs_input_grad[4] else None  # s dy^T (x A^T)  [out, r]
        return dx, None, None, d_a, d_b, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """y = x W^T (+ b) + scale (x A^T) B^T through the fused kernel where it applies, else the reference.

    A and B are cast to x's dtype (autograd casts their gradients back), so fp32 adapters on a bf16 base run the
    rank-r product in bf16 (peft runs it in the adapter's dtype). Under autocast everything is first cast to its
    dtype, as torch's linear layers are.
    """
    kind = x.device.type
    if torch.is_autocast_enabled(kind):  # as F.linear under autocast: every operand in autocast's dtype, so the
        dt = torch.get_autocast_dtype(kind)  # kernel runs in it (and x, W of different dtypes still fuse)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    fused = (kernel_supported(x.device) and not (dropout > 0 and training) and weight.dtype == x.dtype
             and not weight.requires_grad and (bias is None or (not bias.requires_grad and bias.dtype == x.dtype))
             and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and x.shape[-1] == weight.shape[1])
    if not fused:
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, dropout, training)
    x2 = x.reshape(-1, x.shape[-1])
    y = LoraLinearFunction.apply(x2, weight, bias, lora_a.to(x.dtype), lora_b.to(x.dtype), float(scale))
    return y.reshape(*x.shape[:-1], weight.shape[0])
