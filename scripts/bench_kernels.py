"""ftlab's kernels (ftlab.kernels: fused LoRA linear, fused linear + cross-entropy) against torch eager and
torch.compile, forward + backward, on inputs larger than the last-level cache (issue 17).

    python scripts/bench_kernels.py                  # CPU: the torch eager and torch.compile reference rows only
    python scripts/bench_kernels.py --gpu            # GPU (bf16): kernels too, timed by triton.testing.do_bench
    python scripts/bench_kernels.py --json out.json --md out.md

On a CPU, Triton runs only in its interpreter (TRITON_INTERPRET=1), which checks correctness and is not a speed path:
kernel rows say "GPU pending" there. Every timed variant is first checked against the float32 eager result on the same
inputs (forward output and every gradient); a variant that fails is reported as failed, without a time.

Timing: GPU `triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])` (median, p20, p80), with the
gradients reset between runs; CPU the median (and p20..p80) of `--repeats` runs after two warm-up runs, the variants
interleaved (eager, compile, eager, compile, ...), so machine load drifts over both alike. Memory: GPU the peak
allocated during one fwd+bwd above what was allocated before it; CPU the peak resident set above the one at its start
(VmHWM reset through /proc/self/clear_refs), after a gc and malloc_trim.

A kernel module or entry point that is not there yet (the kernels are being written) is a row saying so, not a crash.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (module, entry point, what it computes). `adapt` below calls each with the reference's arguments.
KERNELS = {
    "lora_linear": ("ftlab.kernels.lora_linear", "lora_linear", "y = x W^T + s (x A^T) B^T"),
    "fused_ce": ("ftlab.kernels.fused_ce", "fused_linear_cross_entropy",
                 "mean CE of (h W^T) over labels != -100, no [tokens x vocab] logits"),
}


def adapt(name: str, entry: Callable) -> Callable:
    """The kernel's entry point called as the reference is: lora_linear(x, W, bias, A, B, scale);
    fused_linear_cross_entropy returns the sum over labels != -100 divided by `normalizer` (the mean: their count)."""
    if name == "lora_linear":
        return lambda x, w, a, b, scale: entry(x, w, None, a, b, scale)
    return lambda h, w, labels: entry(h, w, labels, normalizer=float((labels != -100).sum()))

# Shapes: the CPU ones put x (and the logits) well past the 32 MiB L3 of the 2-core CI machine; the GPU ones are the
# 1B shape's (hidden 2048, MLP 8192, vocabulary 128,256) at 8k and 16k tokens, past the 50-60 MB L2.
CPU_SHAPES = {
    "lora_linear": [dict(M=4096, K=1536, N=1536, r=16)],
    "fused_ce": [dict(M=2048, H=512, V=16384)],
}
GPU_SHAPES = {
    "lora_linear": [dict(M=8192, K=2048, N=2048, r=16), dict(M=8192, K=2048, N=8192, r=16),
                    dict(M=16384, K=8192, N=2048, r=16)],
    "fused_ce": [dict(M=8192, H=2048, V=128256), dict(M=16384, H=2048, V=128256)],
}


# ------------------------------------------------------------------------------------------------ references
def lora_reference(x, w, a, b, scale: float):
    import torch

    return torch.nn.functional.linear(x, w) + scale * torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)


def ce_reference(h, w, labels):
    import torch

    logits = torch.nn.functional.linear(h, w).float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)


def make_inputs(kernel: str, shape: dict, device: str, dtype):
    """Fresh random inputs (never zeros); the trained ones require grad (LoRA: x, A, B; W frozen. CE: h, W)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, scale=1.0, grad=False):
        t = (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    if kernel == "lora_linear":
        M, K, N, r = shape["M"], shape["K"], shape["N"], shape["r"]
        args = (rnd(M, K, grad=True), rnd(N, K, scale=K ** -0.5), rnd(r, K, scale=K ** -0.5, grad=True),
                rnd(N, r, scale=r ** -0.5, grad=True), 2.0)
        return args, torch.randn(M, N, generator=g).to(device=device, dtype=dtype)
    M, H, V = shape["M"], shape["H"], shape["V"]
    labels = torch.randint(0, V, (M,), generator=g)
    labels[::7] = -100  # prompt positions: ignored, as in response-only training
    return (rnd(M, H, grad=True), rnd(V, H, scale=H ** -0.5, grad=True), labels.to(device)), None


def fwd_bwd(fn: Callable, args, dy) -> Callable[[], None]:
    """One forward + backward of fn(*args), gradients reset first (so no run accumulates into the last one)."""
    grads = [a for a in args if hasattr(a, "requires_grad") and a.requires_grad]

    def run():
        for t in grads:
            t.grad = None
        y = fn(*args)
        if dy is None:
            y.backward()
        else:
            y.backward(dy)

    return run


def outputs(fn: Callable, args, dy) -> list:
    """fn's output and every gradient, as float32 (for the correctness gate)."""
    import torch

    grads = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    for t in grads:
        t.grad = None
    y = fn(*args)
    (y.backward() if dy is None else y.backward(dy))
    return [y.detach().float()] + [t.grad.detach().float() for t in grads]


def max_rel_err(got: list, ref: list) -> float:
    import torch

    worst = 0.0
    for a, b in zip(got, ref):
        if a.shape != b.shape or not bool(torch.isfinite(a).all()):
            return float("inf")
        worst = max(worst, float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30))
    return worst


# ------------------------------------------------------------------------------------------------ timing and memory
def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(run: Callable[[], None], device: str) -> int:
    import torch

    from ftlab.utils.memory import peak_bytes, reset_peak

    _trim()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        reset_peak(device)
        run()
        torch.cuda.synchronize()
        return peak_bytes(device) - before
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    if not reset_peak(device):
        return 0
    run()
    return peak_bytes(device) - rss


def time_cpu(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, tuple[float, float, float]]:
    """Median, p20, p80 in ms per variant, interleaved."""
    for fn in runs.values():
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
        out[k] = (statistics.median(ts), q[1], q[7])
    return out


def time_gpu(fn: Callable[[], None], grads) -> tuple[float, float, float]:
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8], grad_to_none=grads)
    return med, p20, p80


# ------------------------------------------------------------------------------------------------ the benchmark
def find_kernel(name: str) -> tuple[Optional[Callable], str]:
    """The kernel, called as its reference is, or None and why (module absent, entry point absent)."""
    module, entry, _ = KERNELS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        return None, f"{module} not importable ({e.__class__.__name__}: {str(e)[:80]})"
    fn = getattr(mod, entry, None)
    if fn is None:
        return None, f"{module} has no {entry}"
    return adapt(name, fn), f"{module}.{entry}"


def bench_kernel(name: str, shape: dict, device: str, dtype, repeats: int, compile_ok: bool) -> list[dict]:
    import torch

    ref_fn = lora_reference if name == "lora_linear" else ce_reference
    args, dy = make_inputs(name, shape, device, dtype)
    grads = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    # the correctness reference: float32 eager on the same values
    args32 = tuple(a.detach().float().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                   and a.is_floating_point() else a for a in args)
    ref = outputs(ref_fn, args32, None if dy is None else dy.float())
    eager_err = max_rel_err(outputs(ref_fn, args, dy), ref)
    tol = max(2 * eager_err, 1e-5)  # FlashAttention's rule: no worse than twice the eager low-precision error
    variants: dict[str, Callable] = {"torch eager": ref_fn}
    rows = []
    if compile_ok:
        variants["torch.compile"] = torch.compile(ref_fn, dynamic=False)
    kernel, where = find_kernel(name)
    gpu = device.startswith("cuda")
    if kernel is not None and gpu:
        variants["ftlab kernel"] = kernel
    label = ", ".join(f"{k}={v}" for k, v in shape.items())
    checked = {}
    for k, fn in variants.items():
        try:
            err = max_rel_err(outputs(fn, args, dy), ref)
        except Exception as e:  # a kernel that fails on these inputs is a row, not the end of the benchmark
            checked[k] = f"failed: {e.__class__.__name__}: {str(e)[:100]}"
            continue
        checked[k] = err if err <= tol else f"failed: max rel error {err:.2e} > {tol:.2e}"
    ok = {k: variants[k] for k, v in checked.items() if not isinstance(v, str)}
    runs = {k: fwd_bwd(fn, args, dy) for k, fn in ok.items()}
    if gpu:
        times = {k: time_gpu(fn, grads) for k, fn in runs.items()}
    else:
        times = time_cpu(runs, repeats)
    mem = {k: peak_memory(fn, device) for k, fn in runs.items()}
    eager = times.get("torch eager")
    for k in variants:
        row = {"kernel": name, "shape": label, "variant": k, "dtype": str(dtype).replace("torch.", ""),
               "device": device}
        if isinstance(checked[k], str):
            row.update(status=checked[k])
        else:
            med, p20, p80 = times[k]
            row.update(status="ok", max_rel_err=checked[k], ms=med, p20=p20, p80=p80, peak_bytes=mem[k],
                       speed_vs_eager=eager[0] / med if eager else None,
                       mem_vs_eager=(mem[k] / mem["torch eager"]) if mem.get("torch eager") else None)
        rows.append(row)
    if not gpu:
        rows.append({"kernel": name, "shape": label, "variant": "ftlab kernel", "dtype": str(dtype).replace("torch.", ""),
                     "device": device, "status": "GPU pending" + ("" if kernel is not None else f" ({where})")})
    elif kernel is None:
        rows.append({"kernel": name, "shape": label, "variant": "ftlab kernel", "dtype": str(dtype).replace("torch.", ""),
                     "device": device, "status": f"absent: {where}"})
    return rows


def environment(device: str) -> dict:
    import torch

    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads(),
           "load": "%.2f %.2f %.2f" % os.getloadavg()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "absent"
    env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    if device.startswith("cuda"):
        env["device"] = torch.cuda.get_device_name(0)
    else:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     platform.processor())
        env["device"] = f"CPU {model}, {os.cpu_count()} cores"
    return env


def table(rows: list[dict], env: dict, repeats: int) -> str:
    how = ("triton.testing.do_bench median (p20..p80)" if env["device"] and not env["device"].startswith("CPU")
           else f"median (p20..p80) of {repeats} interleaved runs after 2 warm-up runs")
    out = [f"{env['date']} · {env['device']} · torch {env['torch']}, triton {env['triton']}, {env['threads']} threads "
           f"· load average at start {env['load_start']}, at end {env['load']} · ftlab {env['git']}",
           "",
           "| kernel | shape | dtype | variant | fwd+bwd ms | speed vs eager | peak memory | memory vs eager | "
           "max rel err vs fp32 eager |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {r['variant']} | {r['status']} | | | | |")
            continue
        out.append(f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {r['variant']} | {r['ms']:.2f} "
                   f"({r['p20']:.2f}..{r['p80']:.2f}) | {r['speed_vs_eager']:.2f} | {r['peak_bytes'] / 2**20:,.0f} MiB "
                   f"| {r['mem_vs_eager']:.2f} | {r['max_rel_err']:.1e} |")
    out.append("")
    out.append(f"Time: {how}. Memory: " + ("peak allocated above the allocation before one fwd+bwd."
                                           if not env["device"].startswith("CPU") else
                                           "peak RSS above the RSS at the start of one fwd+bwd (VmHWM)."))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--kernels", default=",".join(KERNELS), help="comma list of " + ", ".join(KERNELS))
    ap.add_argument("--repeats", type=int, default=9, help="CPU: timed runs per variant")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (no C++ compiler here)")
    ap.add_argument("--small", action="store_true", help="CPU: shapes divided by 8 (checks the script, not a number)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    ns = ap.parse_args(argv)

    import torch

    if ns.threads:
        torch.set_num_threads(ns.threads)
    if ns.gpu and not torch.cuda.is_available():
        raise SystemExit("bench_kernels --gpu: no CUDA device here (torch.cuda.is_available() is False)")
    device = "cuda" if ns.gpu else "cpu"
    dtype = torch.bfloat16 if ns.gpu else torch.float32
    names = ns.kernels.split(",")
    bad = [n for n in names if n not in KERNELS]
    if bad:
        raise SystemExit(f"--kernels: unknown {bad}; known: {', '.join(KERNELS)}")
    env = environment(device)
    env["load_start"] = env["load"]
    print(f"bench_kernels: {env['device']}, load {env['load']}", flush=True)
    rows = []

    def write() -> str:  # after every shape: a run cut short by its time limit keeps the rows it measured
        env["load"] = environment(device)["load"]  # the rest as at start
        md = table(rows, env, ns.repeats)
        if ns.md:
            ns.md.parent.mkdir(parents=True, exist_ok=True)
            ns.md.write_text(md + "\n")
        if ns.json:
            ns.json.parent.mkdir(parents=True, exist_ok=True)
            ns.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        return md

    for name in names:
        for shape in (GPU_SHAPES if ns.gpu else CPU_SHAPES)[name]:
            if ns.small:
                shape = {k: (v if k == "r" else max(8, v // 8)) for k, v in shape.items()}
            rows += bench_kernel(name, shape, device, dtype, ns.repeats, not ns.no_compile)
            print(json.dumps(rows[-1]), flush=True)
            write()
    print(write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
