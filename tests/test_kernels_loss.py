"""kernels/fused_ce.py (issue 17): cross-entropy and target log-probs from hidden states and the lm_head without the
[N, V] logits — the Triton kernel (interpreter on a CPU: conftest sets TRITON_INTERPRET=1 before triton is imported)
and the chunked torch path against the unchunked definition, within kernels/tolerances.py; that no tensor of the
logits' size is ever made; and hw.kernels=true training with the loss curve of the plain path."""

import json

import pytest
import torch
import torch.utils._python_dispatch
import torch.utils._pytree
from test_eval_runs import _run

from ftlab.kernels.fused_ce import (
    IGNORE_INDEX,
    fused_linear_cross_entropy,
    fused_linear_kl,
    fused_linear_logprob,
    reference_cross_entropy,
    reference_kl,
    reference_logprob,
)
from ftlab.kernels.tolerances import tolerance

pytestmark = pytest.mark.usefixtures("one_thread")

# odd on purpose: N, H, V multiples of no block size; V spans several vocabulary blocks of the kernel (1024 on CPU)
N, H, V, CHUNK = 45, 19, 2051, 8
CUDA = torch.cuda.is_available()


def _inputs(dtype, device="cpu", bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(device, dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = IGNORE_INDEX  # prompt tokens spread over the chunks
    labels[CHUNK:2 * CHUNK] = IGNORE_INDEX  # one whole chunk without a response token
    labels[-1] = V - 1  # the last column of the last vocabulary block (masked loads)
    return h, w, b, labels.to(device)


def _grads(loss, *ts):
    return torch.autograd.grad(loss, [t for t in ts if t is not None])


def _check(dtype, backend, device="cpu", bias=False):
    h, w, b, labels = _inputs(dtype, device, bias)
    n_resp = int((labels != IGNORE_INDEX).sum())
    got = fused_linear_cross_entropy(h, w, labels, bias=b, normalizer=n_resp, chunk=CHUNK, backend=backend)
    want = reference_cross_entropy(h, w, labels, bias=b, normalizer=n_resp)
    rtol, atol = tolerance("fused_ce", "forward", dtype)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert got.item() > 1.0  # a random head on 2051 classes: ~log V, not a degenerate 0
    rtol, atol = tolerance("fused_ce", "backward", dtype)
    mine = _grads(got * 3.0, h, w, b)  # an incoming gradient other than 1: the backward scales by it
    for name, a, r in zip(("dh", "dW", "db"), mine, _grads(want * 3.0, h, w, b)):
        assert a.dtype == r.dtype, name
        torch.testing.assert_close(a.float(), r.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    assert mine[0][CHUNK:2 * CHUNK].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_cross_entropy_equals_the_reference(dtype, backend):
    _check(dtype, backend)


def test_fused_cross_entropy_with_bias():
    _check(torch.float32, "triton", bias=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_ignored_is_an_exact_zero_with_zero_gradients(backend):
    h, w, _, labels = _inputs(torch.float32)
    labels[:] = IGNORE_INDEX
    loss = fused_linear_cross_entropy(h, w, labels, normalizer=1, chunk=CHUNK, backend=backend)
    dh, dw = _grads(loss, h, w)
    assert loss.item() == 0.0 and dh.abs().max() == 0 and dw.abs().max() == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_logprob_equals_the_reference(dtype, backend):
    _check_logprob(dtype, backend)


def _check_logprob(dtype, backend, device="cpu"):
    h, w, _, targets = _inputs(dtype, device)
    got = fused_linear_logprob(h, w, targets, chunk=CHUNK, backend=backend)
    want = reference_logprob(h.detach(), w.detach(), targets)
    rtol, atol = tolerance("fused_logprob", "forward", dtype)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert (got[targets == IGNORE_INDEX] == 0).all() and (got[targets != IGNORE_INDEX] < 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_kl_equals_the_reference(dtype, backend):
    _check_kl(dtype, backend)


def _check_kl(dtype, backend, device="cpu"):
    h, w, _, _ = _inputs(dtype, device)
    g = torch.Generator().manual_seed(2)
    h_ref = h.detach() + 0.3 * torch.randn(h.shape, generator=g).to(device, dtype)  # a nearby model: KL of order 1
    w_ref = w.detach() + 0.1 * torch.randn(w.shape, generator=g).to(device, dtype)
    got = fused_linear_kl(h, w, h_ref, w_ref, normalizer=7, chunk=CHUNK, backend=backend)
    want = reference_kl(h, w, h_ref, w_ref, normalizer=7)
    rtol, atol = tolerance("fused_kl", "forward", dtype)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert got.item() > 0.01
    rtol, atol = tolerance("fused_kl", "backward", dtype)
    for name, a, r in zip(("dh", "dW"), _grads(got * 3.0, h, w), _grads(want * 3.0, h, w)):
        torch.testing.assert_close(a.float(), r.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    same = fused_linear_kl(h, w, h.detach(), w.detach(), chunk=CHUNK, backend=backend)  # equal sides: exactly 0
    dh, dw = _grads(same, h, w)
    assert same.item() == 0.0 and dh.abs().max() == 0 and dw.abs().max() == 0


def test_bad_shapes_and_backend_are_refused():
    h, w, _, labels = _inputs(torch.float32)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_cross_entropy(h, w[:, :-1], labels)
    with pytest.raises(ValueError, match="normalizer"):
        fused_linear_cross_entropy(h, w, labels, normalizer=0)
    with pytest.raises(ValueError, match="backend"):
        fused_linear_cross_entropy(h, w, labels, backend="cuda")
    with pytest.raises(ValueError, match="h_ref"):
        fused_linear_kl(h, w, h[:-1], w)


# ---------------------------------------------------------------------------------- the logits are never whole
class _Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the bytes of the largest tensor any op returns (forward and backward; Triton's interpreter copies a
    kernel's arguments as uint8 storages, hence bytes, not elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_tensor_of_the_logits_size_is_made(backend):
    n, hdim, v, chunk = 96, 16, 4099, 16
    g = torch.Generator().manual_seed(1)
    h = torch.randn(n, hdim, generator=g, requires_grad=True)
    w = torch.randn(v, hdim, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)

    def largest(fn):
        with _Largest() as probe:
            fn().backward()
        return probe.largest

    ref = largest(lambda: reference_cross_entropy(h, w, labels))
    fused = largest(lambda: fused_linear_cross_entropy(h, w, labels, chunk=chunk, backend=backend))
    assert ref >= n * v * 4  # the probe sees the reference's whole float32 logits
    # one chunk's logits, or dW / h sized tensors: nothing of N x V
    assert fused <= 4 * max(chunk * v, v * hdim, n * hdim), (fused, n * v * 4)


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not CUDA, reason="no CUDA device: the bf16 kernel runs on a GPU only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_kernels_on_gpu(dtype):
    _check(dtype, "triton", device="cuda")
    _check_logprob(dtype, "triton", device="cuda")
    _check_kl(dtype, "triton", device="cuda")


# ----------------------------------------------------------------------------------------- hw.kernels=true
# the loss is the same mean over the same response tokens; the fused path changes the summation order (chunked
# log-sum-exp in float32, dW accumulated chunk by chunk), so on float32 the curves agree to float rounding;
# 1e-5 relative as the other equal-curve tests of the training path (tests/test_train_path.py)
LOSS_RTOL = 1e-5


def _curve(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["loss"] is not None]


# full: the lm_head weight's gradient comes from the kernel; reg=kl: the KL term through fused_linear_kl
@pytest.mark.parametrize("knobs", [("method=lora",), ("method=full",), ("method=full", "reg=kl")])
def test_hw_kernels_loss_curve_equals_the_plain_path(tmp_path, ftlab_cache, monkeypatch, knobs):
    import ftlab.train.fused_loss as fl

    calls = {"ce": 0, "kl": 0}

    def counting(name, real):
        def wrapped(*a, **k):
            calls[name] += 1
            assert k["normalizer"] >= 1
            return real(*a, **k)
        return wrapped

    monkeypatch.setattr(fl, "fused_linear_cross_entropy", counting("ce", fl.fused_linear_cross_entropy))
    monkeypatch.setattr(fl, "fused_linear_kl", counting("kl", fl.fused_linear_kl))
    # lr 3e-3 with 10 warm-up steps: the regime the tolerances were set in. At the world's defaults (full 3e-4, 30
    # warm-up steps) step 3's KL is ~5e-6, and the fused and plain sums of p (log p - log q) differ by ~5e-9 there
    # (fp32 cancellation), above abs 1e-9 — a tolerance question, not a kernel one.
    steps = ["train.max_steps=3", "train.log_every=1", "eval.limit=4", "train.batch_size=8", "eval.probe_every=0",
             "train.lr=3e-3", "train.warmup_steps=10"]
    fast_dir, _ = _run(tmp_path, "fast", [*knobs, "hw.kernels=true", *steps])
    assert calls["ce"] >= 3 and (calls["kl"] >= 3) == ("reg=kl" in knobs)  # the fused paths ran where they apply
    seen = dict(calls)
    plain_dir, _ = _run(tmp_path, "plain", [*knobs, *steps])
    assert calls == seen  # and only when asked
    fast, plain = _curve(fast_dir), _curve(plain_dir)
    assert [r["step"] for r in fast] == [r["step"] for r in plain] == [1, 2, 3]
    for a, b in zip(fast, plain):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), (a, b)
        if "reg=kl" in knobs:
            assert a["reg"] == pytest.approx(b["reg"], rel=LOSS_RTOL, abs=1e-9), (a, b)
        assert a["tokens"] == b["tokens"]
    assert fast_dir != plain_dir
