"""Cross-entropy and target log-probs from hidden states and the output head, without the [N, V] logits.

    loss = fused_linear_cross_entropy(h, W, labels, normalizer=n)   # sum over labels != -100 of -log p, / n
    lp = fused_linear_logprob(h, W, targets)                          # log p(target) per row, no gradient

h [N, H], W [V, H] (the lm_head weight, tied or not), optional bias [V], labels/targets [N] with -100 ignored.
The tokens go through the head `chunk` rows at a time: each chunk's logits [chunk, V] are computed with one matmul,
reduced by a Triton kernel (one program per row, an online max / log-sum-exp over vocabulary blocks, then the softmax
gradient written over the logits in place), and multiplied back into dh (chunk x H) and dW (V x H, accumulated in
float32). The gradients are computed in the forward, as Liger's FusedLinearCrossEntropy does: the backward is a scale
by the incoming gradient, and nothing of size N x V is ever kept. Peak extra memory: one chunk of logits
(chunk x V in h's dtype), dW in float32 (V x H) and dh (N x H).

`normalizer` is the count the sum is divided by (ftlab's loop passes the micro-batch's response tokens and scales by
its share of the global batch, so several processes and micro-batches give the one-process mean). With no
non-ignored label the loss is an exact 0 with zero gradients.

`backend`: "triton" (the kernel; on a CPU only with TRITON_INTERPRET=1 set before triton is imported), "torch" (the
same chunking with torch ops: the reference the tests compare against, and the fallback where Triton cannot run), or
"auto" (triton on CUDA or under the interpreter, else torch). `reference_cross_entropy` / `reference_logprob` are the
unchunked definitions (full logits in float32) used by the tests.

Imports nothing from ftlab (tests/test_layering.py).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

IGNORE_INDEX = -100
# logits elements one chunk may hold (2^24: 64 MiB in float32; a 128k vocabulary gets 128 rows per chunk)
CHUNK_BUDGET = 1 << 24

try:  # the kernel is optional: without triton, backend="auto" is the torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is in the dev and kernels extras
    triton = None


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernel can run on `device`: CUDA, or anything under the interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def chunk_rows(vocab: int, budget: int = CHUNK_BUDGET) -> int:
    return max(1, budget // max(1, vocab))


# --------------------------------------------------------------------------------------------------------- kernel
if triton is not None:

    @triton.jit
    def _ce_rows_kernel(logits_ptr, stride_row, target_ptr, loss_ptr, lse_ptr, V, scale,
                        WRITE_GRAD: tl.constexpr, IGNORE: tl.constexpr, BLOCK_V: tl.constexpr):
        """One row: lse and the target's logit (online over blocks of the vocabulary, in float32); loss = lse - x_t
        (0 when ignored); with WRITE_GRAD the row is overwritten by scale * (softmax - onehot(target)), 0 if ignored."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        target = tl.load(target_ptr + row)
        ignored = target == IGNORE
        m = -float("inf")
        s = 0.0
        x_t = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = cols < V
            x = tl.load(base + cols, mask=valid, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            x_t += tl.sum(tl.where(cols == target, x, 0.0), axis=0)
        lse = m + tl.log(s)
        loss = tl.where(ignored, 0.0, lse - x_t)
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)
        if WRITE_GRAD:
            g_scale = tl.where(ignored, 0.0, scale)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                valid = cols < V
                x = tl.load(base + cols, mask=valid, other=-float("inf")).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
                tl.store(base + cols, (g * g_scale).to(logits_ptr.dtype.element_ty), mask=valid)


    @triton.jit
    def _kl_rows_kernel(a_ptr, stride_a, b_ptr, stride_b, kl_ptr, V, scale,
                        WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        """One row: KL(softmax(a) || softmax(b)) in float32 (online log-sum-exps of both, then the sum); with
        WRITE_GRAD, a is overwritten by scale * d KL / d a = scale * p_a * (log p_a - log p_b - KL)."""
        row = tl.program_id(0).to(tl.int64)
        pa = a_ptr + row * stride_a
        pb = b_ptr + row * stride_b
        ma = -float("inf")
        sa = 0.0
        mb = -float("inf")
        sb = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = cols < V
            a = tl.load(pa + cols, mask=valid, other=-float("inf")).to(tl.float32)
            b = tl.load(pb + cols, mask=valid, other=-float("inf")).to(tl.float32)
            na = tl.maximum(ma, tl.max(a, axis=0))
            sa = sa * tl.exp(ma - na) + tl.sum(tl.exp(a - na), axis=0)
            ma = na
            nb = tl.maximum(mb, tl.max(b, axis=0))
            sb = sb * tl.exp(mb - nb) + tl.sum(tl.exp(b - nb), axis=0)
            mb = nb
        lse_a = ma + tl.log(sa)
        lse_b = mb + tl.log(sb)
        kl = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = cols < V
            la = tl.load(pa + cols, mask=valid, other=0.0).to(tl.float32) - lse_a
            lb = tl.load(pb + cols, mask=valid, other=0.0).to(tl.float32) - lse_b
            kl += tl.sum(tl.where(valid, tl.exp(la) * (la - lb), 0.0), axis=0)
        tl.store(kl_ptr + row, kl)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                valid = cols < V
                la = tl.load(pa + cols, mask=valid, other=0.0).to(tl.float32) - lse_a
                lb = tl.load(pb + cols, mask=valid, other=0.0).to(tl.float32) - lse_b
                g = tl.exp(la) * (la - lb - kl) * scale
                tl.store(pa + cols, g.to(a_ptr.dtype.element_ty), mask=valid)


def _rows_triton(logits: torch.Tensor, target: torch.Tensor, scale: float, write_grad: bool):
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        block = min(triton.next_power_of_2(v), 4096 if logits.device.type == "cuda" else 1024)
        _ce_rows_kernel[(n,)](logits, logits.stride(0), target, loss, lse, v, float(scale),
                              WRITE_GRAD=write_grad, IGNORE=IGNORE_INDEX, BLOCK_V=block)
    return loss, lse


def _rows_torch(logits: torch.Tensor, target: torch.Tensor, scale: float, write_grad: bool):
    """The kernel's contract in torch ops (float32 internally; the gradient overwrites `logits`)."""
    x = logits.float()
    lse = x.logsumexp(-1)
    ignored = target == IGNORE_INDEX
    safe = target.masked_fill(ignored, 0)
    x_t = x.gather(-1, safe[:, None])[:, 0]
    loss = torch.where(ignored, torch.zeros_like(lse), lse - x_t)
    if write_grad:
        g = torch.exp(x - lse[:, None])
        g.scatter_add_(-1, safe[:, None], -torch.ones_like(x_t)[:, None])
        g.mul_(torch.where(ignored, 0.0, scale)[:, None])
        logits.copy_(g)
    return loss, lse


def _kl_triton(a: torch.Tensor, b: torch.Tensor, scale: float, write_grad: bool) -> torch.Tensor:
    n, v = a.shape
    kl = torch.empty(n, dtype=torch.float32, device=a.device)
    if n:
        block = min(triton.next_power_of_2(v), 4096 if a.device.type == "cuda" else 1024)
        _kl_rows_kernel[(n,)](a, a.stride(0), b, b.stride(0), kl, v, float(scale), WRITE_GRAD=write_grad,
                              BLOCK_V=block)
    return kl


def _kl_torch(a: torch.Tensor, b: torch.Tensor, scale: float, write_grad: bool) -> torch.Tensor:
    la, lb = a.float().log_softmax(-1), b.float().log_softmax(-1)
    kl = (la.exp() * (la - lb)).sum(-1)
    if write_grad:
        a.copy_(la.exp() * (la - lb - kl[:, None]) * scale)
    return kl


def _pick(backend: str, device: torch.device, kl: bool = False):
    if backend == "auto":
        backend = "triton" if triton_usable(device) else "torch"
    if backend == "triton":
        if not triton_usable(device):
            raise RuntimeError("fused_ce backend='triton' needs triton and a CUDA device, or TRITON_INTERPRET=1 set "
                               "before triton is imported; use backend='torch' or 'auto'")
        return _kl_triton if kl else _rows_triton
    if backend == "torch":
        return _kl_torch if kl else _rows_torch
    raise ValueError(f"fused_ce backend={backend!r}: use 'auto', 'triton' or 'torch'")


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    out = h @ weight.t()
    if bias is not None:
        out += bias
    return out.contiguous()


# ----------------------------------------------------------------------------------------------- cross-entropy
def _flce_forward(h, weight, bias, labels, normalizer, chunk, backend, need_grad):
    rows = _pick(backend, h.device)
    n, _ = h.shape
    v = weight.shape[0]
    chunk = chunk or chunk_rows(v)
    w = weight.to(h.dtype)
    b = bias.to(h.dtype) if bias is not None else None
    scale = 1.0 / float(normalizer)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if need_grad[0] else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_grad[1] else None
    db = torch.zeros(v, dtype=torch.float32, device=h.device) if need_grad[2] else None
    grad = any(need_grad)
    for s in range(0, n, chunk):
        hc = h[s:s + chunk]
        tc = labels[s:s + chunk].contiguous()
        logits = _chunk_logits(hc, w, b)
        loss, _ = rows(logits, tc, scale, grad)
        total += loss.sum()
        if grad:  # logits now hold d(loss)/d(logits) for this chunk
            if dh is not None:
                dh[s:s + chunk] = logits @ w
            if dw is not None:
                dw.addmm_(logits.t().float(), hc.float()) if logits.dtype != torch.float32 else dw.addmm_(logits.t(), hc)
            if db is not None:
                db += logits.float().sum(0)
        del logits
    return total * scale, dh, dw, db


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, normalizer, chunk, backend):
        need = (h.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        loss, dh, dw, db = _flce_forward(h.detach(), weight.detach(), None if bias is None else bias.detach(),
                                         labels, normalizer, chunk, backend, need)
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, g):
        dh, dw, db = ctx.saved_tensors
        hd, wd, bd = ctx.dtypes
        out_h = (dh * g.to(dh.dtype)).to(hd) if dh is not None else None
        out_w = (dw * g).to(wd) if dw is not None else None
        out_b = (db * g).to(bd) if db is not None else None
        return out_h, out_w, out_b, None, None, None, None


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: Optional[torch.Tensor] = None, normalizer: Optional[float] = None,
                               chunk: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """sum over rows with labels != -100 of -log softmax(h W^T + b)[label], divided by `normalizer` (None: 1, the
    sum). h [N, H], weight [V, H], labels [N] (int64). A float32 scalar; gradients for h, weight and bias."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or labels.shape != h.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy: h [N, H], weight [V, H], labels [N]; got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    norm = 1.0 if normalizer is None else float(normalizer)
    if not norm > 0:
        raise ValueError(f"fused_linear_cross_entropy: normalizer must be > 0, got {normalizer}")
    return FusedLinearCrossEntropy.apply(h, weight, bias, labels.long(), norm, chunk, backend)


# ------------------------------------------------------------------------------------------------- log-probs
@torch.no_grad()
def fused_linear_logprob(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, chunk: Optional[int] = None,
                         backend: str = "auto") -> torch.Tensor:
    """log softmax(h W^T + b)[target] per row (float32 [N]); -100 rows get 0. For scoring (no gradient)."""
    rows = _pick(backend, h.device)
    v = weight.shape[0]
    chunk = chunk or chunk_rows(v)
    w = weight.to(h.dtype)
    b = bias.to(h.dtype) if bias is not None else None
    targets = targets.long()
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        loss, _ = rows(_chunk_logits(h[s:s + chunk], w, b), targets[s:s + chunk].contiguous(), 1.0, False)
        out[s:s + chunk] = -loss
    return out


# ------------------------------------------------------------------------------------------------------ KL
def _kl_forward(h, weight, h_ref, w_ref, normalizer, chunk, backend, need_grad):
    rows = _pick(backend, h.device, kl=True)
    n = h.shape[0]
    chunk = chunk or chunk_rows(weight.shape[0])
    w = weight.to(h.dtype)
    wr = w_ref.to(h_ref.dtype)
    scale = 1.0 / float(normalizer)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if need_grad[0] else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_grad[1] else None
    grad = any(need_grad)
    for s in range(0, n, chunk):
        hc = h[s:s + chunk]
        a = _chunk_logits(hc, w, None)
        b = _chunk_logits(h_ref[s:s + chunk], wr, None)
        total += rows(a, b, scale, grad).sum()
        if grad:  # a now holds d(KL)/d(a) for this chunk
            if dh is not None:
                dh[s:s + chunk] = a @ w
            if dw is not None:
                dw.addmm_(a.t().float(), hc.float())
        del a, b
    return total * scale, dh, dw


class FusedLinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, h_ref, w_ref, normalizer, chunk, backend):
        need = (h.requires_grad, weight.requires_grad)
        loss, dh, dw = _kl_forward(h.detach(), weight.detach(), h_ref.detach(), w_ref.detach(), normalizer, chunk,
                                   backend, need)
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        out_h = (dh * g.to(dh.dtype)).to(ctx.dtypes[0]) if dh is not None else None
        out_w = (dw * g).to(ctx.dtypes[1]) if dw is not None else None
        return out_h, out_w, None, None, None, None, None


def fused_linear_kl(h: torch.Tensor, weight: torch.Tensor, h_ref: torch.Tensor, w_ref: torch.Tensor,
                    normalizer: Optional[float] = None, chunk: Optional[int] = None,
                    backend: str = "auto") -> torch.Tensor:
    """sum over rows of KL(softmax(h W^T) || softmax(h_ref W_ref^T)), / normalizer (None: the sum). Gradients for h
    and weight (the first distribution: ftlab's reg=kl, KL(model || reference)); h_ref and w_ref are constants.
    Swap the sides for KL(base || model) without gradient (the probes). A float32 scalar."""
    if h.shape != h_ref.shape or weight.shape != w_ref.shape or h.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_kl: h, h_ref [N, H] and weight, w_ref [V, H]; got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(h_ref.shape)}, {tuple(w_ref.shape)}")
    norm = 1.0 if normalizer is None else float(normalizer)
    if not norm > 0:
        raise ValueError(f"fused_linear_kl: normalizer must be > 0, got {normalizer}")
    return FusedLinearKL.apply(h, weight, h_ref, w_ref, norm, chunk, backend)


# ------------------------------------------------------------------------------------------------ references
def reference_cross_entropy(h, weight, labels, bias=None, normalizer=None):
    """The definition: whole logits in float32, torch's cross_entropy summed, / normalizer."""
    logits = (h @ weight.to(h.dtype).t()).float()
    if bias is not None:
        logits = logits + bias.float()
    loss = torch.nn.functional.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / (1.0 if normalizer is None else float(normalizer))


def reference_logprob(h, weight, targets, bias=None):
    logits = (h @ weight.to(h.dtype).t()).float()
    if bias is not None:
        logits = logits + bias.float()
    ignored = targets == IGNORE_INDEX
    lp = logits.log_softmax(-1).gather(-1, targets.long().masked_fill(ignored, 0)[:, None])[:, 0]
    return lp.masked_fill(ignored, 0.0)


def reference_kl(h, weight, h_ref, w_ref, normalizer=None):
    """The definition: sum over rows of KL(softmax(h W^T) || softmax(h_ref W_ref^T)), whole logits in float32."""
    la = (h @ weight.to(h.dtype).t()).float().log_softmax(-1)
    lb = (h_ref @ w_ref.to(h_ref.dtype).t()).float().log_softmax(-1)
    return (la.exp() * (la - lb)).sum() / (1.0 if normalizer is None else float(normalizer))
