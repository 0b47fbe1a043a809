"""ftlab's training loop vs HF `transformers.Trainer` + PEFT on the same work, side by side in one process (issue 17).

Each (shape, method) is trained by both sides from the same random weights, on the same rows in the same order (the
ftlab side's seeded `Batches`, handed to the Trainer as an in-order iterable), with the same batch, AdamW (same lr,
betas, weight decay, `adamw_torch` on the HF side: ftlab's `torch.optim.AdamW`), linear schedule with warm-up, grad
clipping at 1.0, and the same steps; no evaluation, checkpoints or logging in either. The sides alternate A/B/A/B
for `--pairs` pairs; each pair gives a ratio ftlab/HF, and the table shows the median and the spread (min..max).

    python scripts/bench_train.py                       # CPU: the tiny world model and a ~30M Llama shape
    python scripts/bench_train.py --quick               # the world model, lora, 2 pairs of few steps (a check)
    python scripts/bench_train.py --gpu                 # GPU: Llama-3.2-1B shape, r=16 all-linear, seq 2048, bf16
    python scripts/bench_train.py --json out.json --md out.md

What is timed: the steps after `--warmup` steps, from the end of the last warm-up step to the end of the last step
(optimizer step, scheduler, zero_grad included), stamped by the same kind of hook on both sides (ftlab: the method's
`on_step_end`; HF: a `TrainerCallback.on_step_end`). Tokens are counted where the model sees them (a forward
pre-hook on the decoder stack: the attention mask's ones, i.e. non-pad tokens), the same way on both sides, and the
run refuses to report a ratio when the two sides trained different numbers of tokens.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` after a reset before each side's training call (the model
already on the device). On CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs by
ftlab.utils.memory) minus the resident set at that reset, after `gc.collect()` and glibc's `malloc_trim(0)`: so the
bytes training added (gradients, optimizer state, activations, the Trainer's own objects). Memory one side freed and
the allocator kept may make the next side's delta read low; alternating the order and the spread show how much.

ftlab's side is `ftlab.pipeline._prepare` (the method's prepare, gradient checkpointing, the distributed wrap and any
`hw.*` wiring as a run does it) then `ftlab.train.loop.train`, without the pipeline's loading and evaluation.
`--hw KEY=VALUE` / `--data KEY=VALUE` set config fields of the ftlab side (e.g. `--hw kernels=true`,
`--data packing=true`, `--hw compile=true`); a field this ftlab does not have is skipped with a note in the table.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Shapes. The world's is ftlab's embedded tiny model (model=tiny) with random weights (speed does not depend on them).
# llama30m: ~30M parameters with the world's char-level tokenizer (vocabulary 100: the parameters are the blocks').
SHAPES = {
    "world": dict(kind="world", seq=(12, 24)),
    "llama30m": dict(kind="llama", hidden_size=512, num_hidden_layers=9, num_attention_heads=8, num_key_value_heads=8,
                     intermediate_size=1536, max_position_embeddings=1024, seq=(96, 256)),
    "llama1b": dict(kind="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, max_position_embeddings=4096,
                    rope_theta=500000.0, tie_word_embeddings=True, seq=(512, 2048)),
}
# After the same steps from the same weights on the same batches, the two sides' trained parameters may differ only by
# float summation order (fp32) or by bf16 rounding of the autocast forward (bf16); more means different training.
DIFF_TOL = {"fp32": 1e-4, "bf16": 5e-2}


@dataclasses.dataclass
class Spec:
    shape: str
    method: str  # lora | full
    steps: int
    warmup: int
    batch: int
    lr: float
    device: str
    precision: str
    r: int
    alpha: float
    n_rows: int = 256


# ------------------------------------------------------------------------------------------------ model and data
def world_tokenizer():
    from ftlab.world.tokenizer import build_tokenizer

    return build_tokenizer()


def build_model(shape: str, tok, device: str = "cpu"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = dict(SHAPES[shape])
    if s.pop("kind") == "world":
        from ftlab.config.schema import WorldConfig
        from ftlab.world.model import build_model as world_model

        return world_model(WorldConfig(), tok)
    s.pop("seq")
    s.setdefault("vocab_size", len(tok))
    torch.manual_seed(0)
    config = LlamaConfig(**s, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, attn_implementation="sdpa")
    with torch.device(device):  # a 1B model's random init takes ~20 s on a CPU, well under one on the GPU
        return LlamaForCausalLM(config)


def train_rows(shape: str, n: int) -> list[dict]:
    """The world's skill rows for the world shape; for the Llama shapes, rows of random printable text whose prompt and
    response lengths spread over the shape's range (so batches pad as real data does), seeded."""
    if SHAPES[shape]["kind"] == "world":
        from ftlab.world.skills import make_examples

        return [r for skill in ("add", "rev", "copy", "sort") for r in make_examples(skill, "train", n // 4)]
    lo, hi = SHAPES[shape]["seq"]
    rng = random.Random(0)
    chars = [chr(c) for c in range(33, 127)]
    rows = []
    for i in range(n):
        total = rng.randint(lo, hi) - 2  # <s> and </s>
        resp = max(1, total // 3)
        rows.append({"id": f"r{i}", "prompt": "".join(rng.choices(chars, k=total - resp)),
                     "response": "".join(rng.choices(chars, k=resp))})
    return rows


def encode(tok, rows: list[dict], max_length: int) -> list[dict]:
    from ftlab.train.batches import encode_rows

    encoded, _ = encode_rows(tok, rows, max_length, fmt="plain")
    return encoded


# ------------------------------------------------------------------------------------------------ measurement
class Meter:
    """Step-end time stamps and the non-pad tokens the decoder saw up to each (the same hooks on both sides)."""

    def __init__(self, model, pad: int):
        self.pad = pad
        self.tokens = 0
        self.padded = 0
        self.stamps: list[tuple[float, int, int]] = []
        decoder = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._handle = decoder.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    # Outside any compiled graph (hw.compile=true): counting in a traced hook would break the graph mid-forward at
    # the int(); disabled, dynamo calls it between the wrapper and the decoder stack, one break at the top.
    @torch.compiler.disable
    def _hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        if mask is not None:
            self.tokens += int(mask.sum())
            self.padded += mask.numel()
        elif ids is not None:  # packed rows (data.packing): no mask; the tail of a pack is pad ids
            self.tokens += int((ids != self.pad).sum())
            self.padded += ids.numel()

    def step_end(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append((time.perf_counter(), self.tokens, self.padded))

    def close(self) -> None:
        self._handle.remove()

    def window(self, warmup: int) -> dict:
        (t0, k0, _), (t1, k1, _) = self.stamps[warmup - 1], self.stamps[-1]
        return {"steps": len(self.stamps), "timed_steps": len(self.stamps) - warmup, "tokens": self.tokens,
                "padded_tokens": self.padded, "timed_tokens": k1 - k0, "timed_s": t1 - t0,
                "tokens_per_s": (k1 - k0) / (t1 - t0)}


def trained_state(model) -> dict:
    """The trained parameters after training, on the CPU, by name: the two sides are compared on them."""
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def state_diff(a: dict, b: dict) -> float:
    """max |a - b| / max |b| over the trained parameters (inf when the names differ)."""
    if set(a) != set(b):
        return float("inf")
    num = max(float((a[k] - b[k]).abs().max()) for k in a)
    den = max(float(b[k].abs().max()) for k in b)
    return num / max(den, 1e-30)


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_start(device: str) -> int:
    import torch

    from ftlab.utils.memory import reset_peak

    _trim()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        reset_peak(device)
        return 0
    if not reset_peak(device):
        raise SystemExit("bench_train: the CPU peak RSS cannot be reset here (/proc/self/clear_refs); no memory column")
    return _rss()


def memory_peak(device: str, base: int) -> int:
    from ftlab.utils.memory import peak_bytes

    return peak_bytes(device) - base


# ------------------------------------------------------------------------------------------------ the two sides
def ftlab_config(spec: Spec, tok, hw_over: dict, data_over: dict):
    """A RunConfig for the ftlab side; `hw_over`/`data_over` set only fields this ftlab has (the rest: noted)."""
    from ftlab.config.schema import DataConfig, HwConfig, ModelConfig, RunConfig, TrainConfig
    from ftlab.methods.base import ALL_LINEAR

    notes = []

    def fields(cls, over: dict, group: str) -> dict:
        have = {f.name for f in dataclasses.fields(cls)}
        for k in sorted(set(over) - have):
            notes.append(f"{group}.{k} skipped: this ftlab's {cls.__name__} has no field {k!r}")
        return {k: v for k, v in over.items() if k in have}

    if spec.method == "lora":
        from ftlab.methods.lora import LoraConfig

        method = LoraConfig(r=spec.r, alpha=spec.alpha, dropout=0.0, target_modules=list(ALL_LINEAR))
    else:
        from ftlab.methods.full import FullConfig

        method = FullConfig()
    method.check()
    hw = HwConfig(device=spec.device, precision=spec.precision, **fields(HwConfig, hw_over, "hw"))
    data = DataConfig(**fields(DataConfig, data_over, "data"))
    train = TrainConfig(max_steps=spec.steps, lr=spec.lr, batch_size=spec.batch, schedule="linear",
                        warmup_steps=min(2, spec.steps), weight_decay=0.0, max_grad_norm=1.0,
                        log_every=spec.steps, save_every=0)
    # model.max_length: the rows' cut, and data.packing's sequence length
    model = ModelConfig(max_length=SHAPES[spec.shape]["seq"][1])
    return RunConfig(method=method, hw=hw, data=data, train=train, model=model), notes


def run_ftlab(spec: Spec, model, tok, rows, encoded, cfg, scratch: Path) -> dict:
    from ftlab import pipeline
    from ftlab.models.structure import pad_id
    from ftlab.train.batches import Batches
    from ftlab.train.loop import LoopSettings, train

    base = memory_start(spec.device)
    record = _Record()
    r = pipeline._Run(cfg=cfg, run_dir=scratch, record=record, device=spec.device, main=True, progress=False,
                      resume=None, model=model, tok=tok, train_rows=rows, encoded=encoded)
    pipeline._prepare(r)
    meter = Meter(r.model, pad_id(tok))
    step_end = r.method.on_step_end

    def on_step_end(model, opt, step):
        step_end(model, opt, step)
        meter.step_end()

    r.method.on_step_end = on_step_end
    res = train(r.model, r.method, Batches(encoded, spec.batch, cfg.seed), LoopSettings.of(cfg), device=spec.device,
                pad_id=pad_id(tok), run_dir=scratch, progress=False, forward=r.forward)
    meter.close()
    out = meter.window(spec.warmup)
    out.update(peak_bytes=memory_peak(spec.device, base), final_loss=res.final_loss, loop_tokens=res.tokens,
               trainable=res.trainable_params)
    out["_state"] = trained_state(r.model)
    out["record"] = record.data  # what the run would have recorded (hw.kernels: which Liger ops applied)
    return out


class _Record:
    """Stands in for the run's RunRecord: keeps what _prepare records."""

    def __init__(self):
        self.data: dict = {}

    def update(self, **kw) -> None:
        self.data.update(kw)


class _InOrder:
    """The rows in the ftlab side's batch order, as an iterable dataset (the Trainer samples nothing)."""

    def __init__(self, encoded, batch: int, seed: int, steps: int):
        from ftlab.train.batches import Batches

        b = Batches(encoded, batch, seed)
        self.rows = [row for _ in range(steps) for row in b.next()]

    def __iter__(self):
        return iter(self.rows)


def run_hf(spec: Spec, model, tok, encoded, scratch: Path) -> dict:
    import peft
    import torch
    from torch.utils.data import IterableDataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ftlab.methods.base import ALL_LINEAR
    from ftlab.models.structure import pad_id
    from ftlab.train.batches import collate

    base = memory_start(spec.device)
    if spec.method == "lora":
        torch.manual_seed(0)  # the adapters' init draws as ftlab's prepare does after seed_everything(seed)
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=spec.r, lora_alpha=spec.alpha,
                                                           lora_dropout=0.0, target_modules=list(ALL_LINEAR)))
    meter = Meter(model, pad_id(tok))

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            meter.step_end()

    class Rows(IterableDataset):
        def __init__(self):
            self.inner = _InOrder(encoded, spec.batch, 0, spec.steps)

        def __iter__(self):
            return iter(self.inner)

    pid = pad_id(tok)
    args = TrainingArguments(
        output_dir=str(scratch), max_steps=spec.steps, per_device_train_batch_size=spec.batch,
        learning_rate=spec.lr, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, optim="adamw_torch",
        lr_scheduler_type="linear", warmup_steps=min(2, spec.steps), max_grad_norm=1.0, seed=0,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=not spec.device.startswith("cuda"), bf16=spec.precision == "bf16", dataloader_num_workers=0,
        remove_unused_columns=False, dataloader_pin_memory=False)
    # the same right padding as ftlab's collate (a DataCollatorForSeq2Seq pads the same way; this keeps the shapes
    # identical by construction)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=lambda rows: collate(rows, pid),
                      callbacks=[Stamp()])
    out_train = trainer.train()
    meter.close()
    out = meter.window(spec.warmup)
    out.update(peak_bytes=memory_peak(spec.device, base), final_loss=float(out_train.training_loss),
               trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    out["_state"] = trained_state(model)
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------ the benchmark
def bench(spec: Spec, pairs: int, hw_over: dict, data_over: dict, log=print) -> dict:
    import torch

    tok = world_tokenizer()
    rows = train_rows(spec.shape, spec.n_rows)
    max_len = SHAPES[spec.shape]["seq"][1]
    encoded = encode(tok, rows, max_len)
    cfg, notes = ftlab_config(spec, tok, hw_over, data_over)
    packing = bool(getattr(cfg.data, "packing", False))
    proto = build_model(spec.shape, tok, spec.device)
    n_params = sum(p.numel() for p in proto.parameters())
    # kept on the CPU: a copy on the device would sit in both sides' peak memory (5 GB at the 1B shape)
    proto_state = {k: v.detach().to("cpu", copy=True) for k, v in proto.state_dict().items()}
    del proto
    runs = {"ftlab": [], "hf": []}
    diff = None
    # pair 0 warms up (imports, thread pools, the allocator's first growth, kernels' autotuning) and is not counted
    for i in range(pairs + 1):
        for side in ("ftlab", "hf"):
            model = build_model(spec.shape, tok, spec.device).to(spec.device)
            model.load_state_dict(proto_state)
            with tempfile.TemporaryDirectory(prefix=f"bench_{side}_") as scratch:
                if side == "ftlab":
                    r = run_ftlab(spec, model, tok, rows, encoded, cfg, Path(scratch))
                else:
                    r = run_hf(spec, model, tok, encoded, Path(scratch))
            del model
            _trim()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            state = r.pop("_state")
            if i == 0 and side == "ftlab":
                first = state
            elif i == 0:
                diff = state_diff(first, state)
                del first
            del state
            if i > 0:
                runs[side].append(r)
            log(f"  {spec.shape} {spec.method} pair {i}{' (warm-up)' if i == 0 else ''} {side}: {r['tokens_per_s']:,.0f} tok/s, "
                f"peak +{r['peak_bytes'] / 2**20:,.0f} MiB, tokens {r['tokens']}")
    for a, b in zip(runs["ftlab"], runs["hf"]):
        # packed rows (data.packing) pad less by design: the non-pad tokens must still be the same
        if a["tokens"] != b["tokens"] or a["steps"] != b["steps"] or (a["padded_tokens"] != b["padded_tokens"]
                                                                       and not packing):
            raise SystemExit(f"bench_train: {spec.shape} {spec.method}: the sides did different work (ftlab "
                             f"{a['steps']} steps, {a['tokens']} tokens, {a['padded_tokens']} padded; HF {b['steps']}, "
                             f"{b['tokens']}, {b['padded_tokens']}): no ratio reported")
        if a["trainable"] != b["trainable"]:
            raise SystemExit(f"bench_train: {spec.shape} {spec.method}: trainable parameters differ (ftlab "
                             f"{a['trainable']}, HF {b['trainable']}): not the same model")
    if not diff <= DIFF_TOL[spec.precision]:
        raise SystemExit(f"bench_train: {spec.shape} {spec.method}: the trained parameters differ between the sides "
                         f"by {diff:.3g} of their largest value (tolerance {DIFF_TOL[spec.precision]:g} for "
                         f"{spec.precision}): not the same training; no ratio reported")
    first = runs["ftlab"][0]
    if first.get("record"):
        notes.append(f"ftlab recorded {json.dumps(first['record'])}")
    if packing:
        notes.append(f"ftlab side packed (data.packing=true): {first['padded_tokens']} positions per side vs HF's "
                     f"{runs['hf'][0]['padded_tokens']} padded, for the same {first['tokens']} tokens")
    speed = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["ftlab"], runs["hf"])]
    mem = [a["peak_bytes"] / b["peak_bytes"] if b["peak_bytes"] > 0 else float("nan")
           for a, b in zip(runs["ftlab"], runs["hf"])]
    return {"shape": spec.shape, "method": spec.method, "params": n_params, "trainable": runs["ftlab"][0]["trainable"],
            "batch": spec.batch, "steps": spec.steps, "warmup": spec.warmup, "pairs": pairs,
            "tokens_per_side": runs["ftlab"][0]["tokens"], "padded_tokens_per_side": runs["ftlab"][0]["padded_tokens"],
            "ftlab_tok_s": statistics.median(r["tokens_per_s"] for r in runs["ftlab"]),
            "hf_tok_s": statistics.median(r["tokens_per_s"] for r in runs["hf"]),
            "speed_ratio": statistics.median(speed), "speed_min": min(speed), "speed_max": max(speed),
            "ftlab_peak": statistics.median(r["peak_bytes"] for r in runs["ftlab"]),
            "hf_peak": statistics.median(r["peak_bytes"] for r in runs["hf"]),
            "mem_ratio": statistics.median(mem), "mem_min": min(mem), "mem_max": max(mem),
            "param_diff": diff, "notes": notes, "runs": runs}


def matmul_peak_tflops(n: int = 8192, reps: int = 20) -> float:
    """The measured bf16 matmul rate of this GPU (n x n x n, median of `reps`), the denominator of MFU."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def environment(device: str) -> dict:
    import peft
    import torch
    import transformers

    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "threads": torch.get_num_threads()}
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip()
    except OSError:
        env["git"] = "?"
    if device.startswith("cuda"):
        env["device"] = torch.cuda.get_device_name(0)
    else:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     platform.processor())
        env["device"] = f"CPU {model}, {os.cpu_count()} cores"
    env["load"] = "%.2f %.2f %.2f" % os.getloadavg()
    return env


def table(rows: list[dict], env: dict, device: str) -> str:
    mem_how = ("peak allocated (CUDA), absolute" if device.startswith("cuda")
               else "peak RSS minus RSS at the side's start (VmHWM, /proc/self/clear_refs)")
    out = [f"{env['date']} · {env['device']} · torch {env['torch']}, transformers {env['transformers']}, "
           f"peft {env['peft']}, {env['threads']} threads · load average at start {env['load_start']}, "
           f"at end {env['load']} · ftlab {env['git']}",
           "",
           "| shape | method | params (trainable) | batch x steps (timed) | tokens/side (padded) | ftlab tok/s | "
           "HF tok/s | speed ftlab/HF median (min..max) | ftlab peak | HF peak | memory ftlab/HF median (min..max) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['shape']} | {r['method']} | {r['params'] / 1e6:.2f}M ({r['trainable'] / 1e6:.3f}M) | "
            f"{r['batch']} x {r['steps']} ({r['steps'] - r['warmup']}) | {r['tokens_per_side']} "
            f"({r['padded_tokens_per_side']}) | {r['ftlab_tok_s']:,.0f} | {r['hf_tok_s']:,.0f} | "
            f"{r['speed_ratio']:.2f} ({r['speed_min']:.2f}..{r['speed_max']:.2f}) | "
            f"{r['ftlab_peak'] / 2**20:,.0f} MiB | {r['hf_peak'] / 2**20:,.0f} MiB | "
            f"{r['mem_ratio']:.2f} ({r['mem_min']:.2f}..{r['mem_max']:.2f}) |")
    peak = env.get("matmul_tflops")
    if peak:
        for r in rows:
            if r["method"] == "full":  # 6 N per token (forward 2N, backward 4N), attention not counted
                out.append(f"\nMFU, {r['shape']} full: ftlab {6 * r['params'] * r['ftlab_tok_s'] / 1e12 / peak:.1%}, "
                           f"HF {6 * r['params'] * r['hf_tok_s'] / 1e12 / peak:.1%} of the measured bf16 matmul rate "
                           f"{peak:.0f} TFLOP/s (6 N tokens/s, N = all {r['params'] / 1e9:.3f}B parameters, "
                           "attention FLOPs not counted)")
    out.append("")
    out.append(f"Pairs per row: {rows[0]['pairs'] if rows else 0} after one warm-up pair, A/B/A/B (ftlab first). "
               f"Memory: {mem_how}. Same training checked: the sides' trained parameters after the warm-up pair "
               "differ by at most " + ", ".join(f"{r['shape']} {r['method']} {r['param_diff']:.1e}" for r in rows)
               + " of their largest value.")
    for r in rows:
        for n in r["notes"]:
            out.append(f"- {r['shape']} {r['method']}: {n}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU shape (Llama-3.2-1B, r=16, seq 2048, bf16)")
    ap.add_argument("--quick", action="store_true", help="world shape, lora, 2 pairs of 4 steps (checks the script)")
    ap.add_argument("--shapes", default=None, help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps at the start of each side")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--hw", action="append", default=[], metavar="KEY=VALUE", help="ftlab side's hw.KEY (kernels ...)")
    ap.add_argument("--data", action="append", default=[], metavar="KEY=VALUE", help="ftlab side's data.KEY (packing)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    ns = ap.parse_args(argv)

    import torch
    import yaml

    if ns.threads:
        torch.set_num_threads(ns.threads)
    if ns.gpu and not torch.cuda.is_available():
        raise SystemExit("bench_train --gpu: no CUDA device here (torch.cuda.is_available() is False)")
    device = "cuda" if ns.gpu else "cpu"
    if ns.gpu:
        shapes, pairs, steps, warmup, batch, lr, prec, r, alpha = ["llama1b"], 3, 12, 4, 4, 2e-4, "bf16", 16, 32.0
    elif ns.quick:
        shapes, pairs, steps, warmup, batch, lr, prec, r, alpha = ["world"], 2, 4, 1, 8, 1e-3, "fp32", 8, 16.0
        ns.methods = ns.methods if ns.methods != "lora,full" else "lora"
    else:
        shapes, pairs, steps, warmup, batch, lr, prec, r, alpha = ["world", "llama30m"], 3, 12, 2, 8, 1e-3, "fp32", 8, 16.0
    shapes = ns.shapes.split(",") if ns.shapes else shapes
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        raise SystemExit(f"--shapes: unknown {bad}; known: {', '.join(SHAPES)}")
    pairs, steps = ns.pairs or pairs, ns.steps or steps
    warmup, batch = ns.warmup if ns.warmup is not None else warmup, ns.batch or batch
    if not 1 <= warmup < steps:
        raise SystemExit(f"--warmup {warmup}: must be >= 1 and below --steps {steps} (the timed window starts at the "
                         "end of the last warm-up step)")

    def kv(items: list[str], flag: str) -> dict:
        out = {}
        for item in items:
            if "=" not in item:
                raise SystemExit(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} kernels=true")
            k, v = item.split("=", 1)
            out[k] = yaml.safe_load(v)
        return out

    hw_over, data_over = kv(ns.hw, "--hw"), kv(ns.data, "--data")
    env = environment(device)
    env["load_start"] = env["load"]
    if ns.gpu:
        env["matmul_tflops"] = matmul_peak_tflops()
        print(f"bench_train: bf16 matmul 8192^3: {env['matmul_tflops']:.0f} TFLOP/s (the MFU denominator)", flush=True)
    print(f"bench_train: {env['device']}, load {env['load']}", flush=True)
    rows = []
    for shape in shapes:
        for method in ns.methods.split(","):
            if method not in ("lora", "full"):
                raise SystemExit(f"--methods: {method!r}; known: lora, full")
            spec = Spec(shape=shape, method=method, steps=steps, warmup=warmup, batch=batch,
                        lr=lr if method == "lora" else lr / 10, device=device, precision=prec, r=r, alpha=alpha)
            rows.append(bench(spec, pairs, hw_over, data_over, log=lambda s: print(s, flush=True)))
            md = write(rows, env, device, ns.md, ns.json)  # after every row: a run cut short keeps what it measured
    print(md)
    return 0


def write(rows: list[dict], env: dict, device: str, md_path, json_path) -> str:
    env.update({k: v for k, v in environment(device).items() if k in ("load", "device")})  # git, date: at start
    md = table(rows, env, device)
    if md_path:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(md + "\n")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return md


if __name__ == "__main__":
    sys.exit(main())
