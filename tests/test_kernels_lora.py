"""kernels/lora_linear.py against its plain-torch reference, within kernels/tolerances.py.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set by conftest before triton is imported), fp32 and fp16.
GPU (skipped without CUDA; run with TRITON_INTERPRET=0 to compile the kernels): the same in bf16 too.
Shapes are odd on purpose: in/out/r and the token count are not multiples of the 32-wide blocks or of 16.
"""

import json
import os

import pytest
import torch
from test_resume import assets  # noqa: F401 - fixture: a tiny local Llama and a jsonl of additions

pytest.importorskip("triton")

from ftlab.kernels.lora_linear import LoraLinearFunction, kernel_supported, lora_linear, lora_linear_reference  # noqa: E402
from ftlab.kernels.tolerances import tolerance  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# (tokens, in, out, r): one block and a ragged edge; several blocks in every dimension; r = 1
SHAPES = [(7, 19, 23, 3), (37, 45, 70, 5), (33, 40, 17, 1)]


def _inputs(tokens, n_in, n_out, r, dtype, device, bias=True, lead=None):
    g = torch.Generator().manual_seed(tokens * 1000 + n_in * 10 + r)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    x = rnd(*(lead or (tokens,)), n_in).requires_grad_()
    w = rnd(n_out, n_in, std=n_in ** -0.5)
    b = rnd(n_out) if bias else None
    a = rnd(r, n_in, std=n_in ** -0.5).requires_grad_()
    bb = rnd(n_out, r, std=r ** -0.5).requires_grad_()  # nonzero B: a zero B would hide every rank-r error
    return x, w, b, a, bb


@pytest.fixture
def small_tiles(monkeypatch):
    """32-wide tiles in the interpreter: several tiles per dimension and several K-steps on these shapes."""
    import ftlab.kernels.lora_linear as kl

    monkeypatch.setattr(kl, "INTERPRET_MAX_BLOCK", 32)


def _check(shape, dtype, device, bias=True, lead=None, scale=0.75):
    x, w, b, a, bb = _inputs(*shape, dtype, device, bias, lead)
    y = lora_linear(x, w, b, a, bb, scale)
    assert y.grad_fn is not None and "View" in type(y.grad_fn).__name__  # the kernel's path, not the reference's
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    y_ref = lora_linear_reference(x, w, b, a, bb, scale)
    grads_ref = torch.autograd.grad(y_ref, (x, a, bb), dy)
    rtol, atol = tolerance("lora_linear", "forward", dtype)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    rtol, atol = tolerance("lora_linear", "backward", dtype)
    for name, got, want in zip(("dx", "dA", "dB"), grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


cpu_only = pytest.mark.skipif(not INTERPRET, reason="CPU kernels need TRITON_INTERPRET=1 before triton is imported")
tiles = pytest.mark.usefixtures("small_tiles")


@tiles
@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_lora_linear_matches_reference_cpu_interpreter(shape, dtype):
    _check(shape, dtype, "cpu")


@tiles
@cpu_only
def test_lora_linear_no_bias_batched_leading_dims():
    _check((15, 21, 26, 4), torch.float32, "cpu", bias=False, lead=(3, 5))


@tiles
@cpu_only
def test_lora_linear_gradients_when_x_is_a_constant():
    x, w, b, a, bb = _inputs(37, 45, 70, 5, torch.float32, "cpu")
    x = x.detach()
    y = lora_linear(x, w, b, a, bb, 0.75)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, (a, bb), dy)
    want = torch.autograd.grad(lora_linear_reference(x, w, b, a, bb, 0.75), (a, bb), dy)
    rtol, atol = tolerance("lora_linear", "backward", torch.float32)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol)


@tiles
@cpu_only
def test_lora_linear_kernel_path_is_taken_and_errors_would_show():
    """The comparison can fail: a kernel output with B's rank-r term dropped is far outside the table."""
    x, w, b, a, bb = _inputs(37, 45, 70, 5, torch.float32, "cpu")
    y = LoraLinearFunction.apply(x, w, b, a, bb, 0.75)
    assert kernel_supported("cpu")
    rtol, atol = tolerance("lora_linear", "forward", torch.float32)
    torch.testing.assert_close(y, lora_linear_reference(x, w, b, a, bb, 0.75), rtol=rtol, atol=atol)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=rtol, atol=atol)


@tiles
@cpu_only
def test_lora_linear_under_autocast_runs_in_its_dtype():
    """The training loop's hw.precision autocast: fp32 weights and input, the kernel in fp16 like F.linear."""
    x, w, b, a, bb = _inputs(37, 45, 70, 5, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        y = lora_linear(x, w, b, a, bb, 0.75)
        y_ref = lora_linear_reference(x, w, b, a, bb, 0.75)
    assert y.dtype == y_ref.dtype == torch.float16 and "View" in type(y.grad_fn).__name__
    rtol, atol = tolerance("lora_linear", "forward", torch.float16)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float16)
    grads, grads_ref = (torch.autograd.grad(t, (x, a, bb), dy) for t in (y, y_ref))
    rtol, atol = tolerance("lora_linear", "backward", torch.float16)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == torch.float32  # the leaves' dtype, as autocast gives
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_lora_linear_falls_back_to_reference():
    """Dropout in training, a trainable W, or mixed dtypes: the reference (W's gradient exists, dropout applies)."""
    x, w, b, a, bb = _inputs(7, 19, 23, 3, torch.float32, "cpu")
    w.requires_grad_()
    y = lora_linear(x, w, b, a, bb, 0.5)
    assert torch.autograd.grad(y.sum(), w)[0].shape == w.shape
    w.requires_grad_(False)
    torch.manual_seed(0)
    y_drop = lora_linear(x, w, b, a, bb, 0.5, dropout=0.5, training=True)
    torch.manual_seed(0)
    torch.testing.assert_close(y_drop, lora_linear_reference(x, w, b, a, bb, 0.5, dropout=0.5, training=True))
    y_eval = lora_linear(x, w, b, a, bb, 0.5, dropout=0.5, training=False)  # dropout off in eval: the kernel
    torch.testing.assert_close(y_eval, lora_linear_reference(x, w, b, a, bb, 0.5), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [(517, 300, 650, 16)])
def test_lora_linear_matches_reference_gpu(shape, dtype):
    _check(shape, dtype, "cuda")


# ------------------------------------------------------------------------------------------------ wiring
# float32 on CPU: the kernel's blocked sums differ from torch's matmul by float32 rounding only (measured 1e-7
# relative over the 4 steps below; 7e-8 on the small world); 1e-5 leaves room for another CPU's summation order while a
# wrong or missing term (a changed loss from the first step on) stays far outside
LOSS_RTOL = 1e-5


@cpu_only
def test_hw_kernels_lora_run_equals_peft_forward_and_exports_the_same_adapter(assets, tmp_path, monkeypatch):
    """test_resume's tiny local Llama (LoRA on every linear, dropout 0 so the kernel also trains): hw.kernels=true
    gives the plain run's loss curve and a peft adapter of the same keys, shapes and config."""
    from safetensors.torch import load_file
    from test_resume import make_run, overrides

    import ftlab.kernels.lora_linear as kl
    from ftlab.pipeline import run_from_dir

    calls = []
    real = kl.lora_linear
    monkeypatch.setattr(kl, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    base = [o for o in overrides(assets, "train.max_steps=4", "train.save_every=0") if not o.startswith("method.dropout")]
    dirs = {}
    for name, extra in (("fused", ["hw.kernels=true"]), ("plain", [])):
        dirs[name] = make_run(tmp_path, name, [*base, "method.dropout=0.0", *extra])
        result = run_from_dir(dirs[name], progress=False)
        if name == "fused":
            n_calls = len(calls)
            assert result["kernels"]["lora_linear"] == 14  # 7 linears x 2 layers
        else:
            assert len(calls) == n_calls > 0 and "kernels" not in result  # the kernel ran in the hw.kernels run only
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()] for d in dirs.values()]
    losses = [[v for v in c if v is not None] for c in losses]
    assert len(losses[0]) == len(losses[1]) == 4 and losses[1][-1] != losses[1][0]  # the steps trained
    assert losses[0] == pytest.approx(losses[1], rel=LOSS_RTOL)
    finals = [d / "checkpoints" / "final" for d in dirs.values()]
    adapters = [load_file(str(f / "adapter_model.safetensors")) for f in finals]
    assert {k: v.shape for k, v in adapters[0].items()} == {k: v.shape for k, v in adapters[1].items()}
    assert (finals[0] / "adapter_config.json").read_text() == (finals[1] / "adapter_config.json").read_text()


def test_hw_kernels_refused_without_triton(monkeypatch):
    import importlib.util

    from conftest import FAST

    from ftlab.cli.run import check
    from ftlab.config.registry import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises((ConfigError, SystemExit), match="hw.kernels: needs triton"):
        check(FAST + ["method=lora", "hw.kernels=true"])
    assert check(FAST + ["method=lora", "hw.kernels=false"])  # the default needs nothing


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


@cpu_only
@pytest.mark.parametrize("name", ["lora", "rslora", "pissa", "olora"])
def test_lora_family_fused_forward_and_grads_equal_peft(name):
    """Each LoRA-family init (B != 0 after PiSSA/OLoRA, rsLoRA's scale) through the swapped forward: the same
    logits and LoRA gradients as peft's forward, on one model (the swap undone by restoring peft's forward)."""
    from ftlab.config.method import METHODS
    from ftlab.methods import MethodContext, build_method

    method = build_method(METHODS.config(name)())
    model = method.prepare(_tiny_llama(), MethodContext(tokenizer=None, train_rows=[], seed=0))
    for n, p in model.named_parameters():  # B = 0 at LoRA's init would hide the rank-r path
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))

    def run():
        model.zero_grad()
        out = model(input_ids=ids).logits
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want, want_g = run()
    assert method.use_kernels(model, "cpu")["lora_linear"] == 7  # q k v o gate up down of the one layer
    got, got_g = run()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got_g.keys() == want_g.keys()
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_dora_keeps_peft_forward_and_the_family_shares_the_swap():
    from ftlab.methods.corda import Corda
    from ftlab.methods.lora import Dora, Lora
    from ftlab.methods.lora_ga import LoraGa

    assert Dora.use_kernels(None, None, "cpu") is None
    assert Corda.use_kernels is Lora.use_kernels and LoraGa.use_kernels is Lora.use_kernels
