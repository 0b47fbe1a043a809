"""Pretraining the world's base model: seeded batches of the pretraining skills, AdamW with warmup and cosine
decay, and a thread governor that keeps a step's thread count sane on a loaded machine."""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Callable, Iterator, Optional

import torch

from ftlab.utils.padding import pad_batch
from ftlab.utils.progress import Bar
from ftlab.world import skills as sk
from ftlab.world.model import build_model, world_config
from ftlab.world.tokenizer import build_tokenizer

# At most this many intra-op threads while pretraining: the model is tiny (0.14 M parameters, batch 128 x
# ~19 tokens), so more threads mostly add synchronisation.
MAX_THREADS = 4


WEIGHT_DECAY = 0.01


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _num_threads() -> int:
    """Intra-op threads for pretraining: $FTLAB_WORLD_THREADS if set, else the usable cores, at most 4."""
    env = os.environ.get("FTLAB_WORLD_THREADS")
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_THREADS))


class _ThreadGovernor:
    """Chooses between N intra-op threads and 1 while pretraining, so a busy machine cannot stall it.

    Why: with 2 OpenMP threads on 2 cores, a step took ~38 ms on an idle machine but 0.9-2.5 s while another
    process kept one core busy (every parallel region waits for the descheduled thread), against ~65-110 ms
    for 1 thread. So every `every` steps, from step `at`, it runs `length` steps with the *other* thread
    count and keeps whichever was faster (median of recent steps). A stall between probes (N-thread steps
    `stall` x slower than their best) probes at once. While on 1 thread, failed probes of N threads back
    off (interval doubles) and last 2 steps: they are the slow ones.

    The thread count changes float summation order in some backward reductions (weights differ in the 7th
    digit). The probe schedule is fixed, so on an idle machine the mode never changes and the weights are
    identical from build to build; a switch (recorded in `switches`) only happens when the machine is busy.
    $FTLAB_WORLD_THREADS pins the count and turns the governor off.
    """

    def __init__(self, n: int, adaptive: bool, every: int = 250, at: int = 20, length: int = 4,
                 stall: float = 2.5):
        self.n, self.mode = n, n
        self.adaptive = adaptive and n > 1
        self.every, self.length, self.stall = every, length, stall
        self.next_probe, self.interval = at, every
        self.times: dict[int, list[float]] = {1: [], n: []}
        self.best: Optional[float] = None  # best median of 8 N-thread steps since the last probe
        self.switches: list[tuple[int, int]] = []  # (step, new thread count)

    def _probe_len(self) -> int:
        return self.length if self.mode == self.n else 2

    def _in_probe(self, step: int) -> bool:
        return self.next_probe <= step < self.next_probe + self._probe_len()

    def threads_for(self, step: int) -> int:
        if not self.adaptive:
            return self.n
        if self._in_probe(step):
            return 1 if self.mode == self.n else self.n
        return self.mode

    def record(self, step: int, threads: int, seconds: float) -> None:
        if not self.adaptive:
            return
        t = self.times[threads]
        t.append(seconds)
        del t[:-8]
        if not self._in_probe(step):
            if self.mode == self.n and len(t) == 8:
                m = sorted(t)[4]
                self.best = m if self.best is None else min(self.best, m)
                if m > self.stall * self.best and step + 1 < self.next_probe:
                    self.next_probe = step + 1  # stalled: probe 1 thread now rather than at the next slot
            return
        if step != self.next_probe + self._probe_len() - 1:
            return
        med = {k: sorted(v)[len(v) // 2] for k, v in self.times.items() if v}
        best = min(med, key=med.get) if len(med) == 2 else self.mode
        if best != self.mode:
            self.mode = best
            self.switches.append((step + 1, best))
            self.interval = self.every
        elif self.mode != self.n:
            self.interval *= 2  # N threads still stalled: probe less often
        self.best = None  # relearn the N-thread baseline after every probe
        self.next_probe += self.interval


def _autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast("cpu", dtype=torch.float16)
    return contextlib.nullcontext()


class _Batcher:
    """Turns the example stream into (inputs, targets) tensors for `<s> prompt response </s>`, right-padded.

    inputs are the sequence without its final `</s>` (nothing follows it to predict); targets[t] is the token
    input t should predict, or -100 where no loss is taken (prompt, pad).
    """

    def __init__(self, tokenizer, skills, seed: int):
        self.vocab = tokenizer.get_vocab()
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.stream = sk.sample_stream(skills, seed=seed, split="train")

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.vocab
        rows, tgts = [], []
        for _ in range(batch_size):
            prompt, response = next(self.stream)
            p = [self.bos] + [v[c] for c in prompt]
            r = [v[c] for c in response] + [self.eos]
            # The last prompt token (`=`) predicts the first response token, ..., the last one predicts </s>.
            rows.append(p + r[:-1])
            tgts.append([-100] * (len(p) - 1) + r)
        return pad_batch(rows, self.pad), pad_batch(tgts, -100)  # right padding (rows and targets: same lengths)


def _lr_at(step: int, cfg: dict) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to 0 at `steps`."""
    warm, total = cfg["warmup_steps"], cfg["steps"]
    if step < warm:
        return cfg["lr"] * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def pretrain(world: Any, progress: bool = True, tokenizer=None, log_every: int = 25,
             callback: Optional[Callable[[int, Any], None]] = None, callback_every: int = 0) -> tuple[Any, dict]:
    """Pretrain a fresh base model on `world`'s skills in memory (no caching; see `ensure_base`).

    `callback(step, model)` runs every `callback_every` steps (and must not touch the RNGs it does not own).

    Returns:
        (model in eval mode, stats dict with ``steps``, ``final_loss``, ``train_s``, ``n_params``).
    """
    cfg = world_config(world)
    tok = tokenizer or build_tokenizer()
    gov = _ThreadGovernor(_num_threads(), adaptive=not os.environ.get("FTLAB_WORLD_THREADS"))
    with _threads(gov.n):
        model = build_model(cfg, tok)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-8,
        )
        batches = _Batcher(tok, cfg["skills"], cfg["seed"])
        torch.manual_seed(cfg["seed"])
        t0 = time.perf_counter()
        loss_ema = None
        with Bar(cfg["steps"], "[bold]pretraining tiny world", "loss {task.fields[loss]:.4f}", enabled=progress,
                 loss=float("nan")) as bar:
            for step in range(cfg["steps"]):
                n = gov.threads_for(step)
                if n != torch.get_num_threads():
                    torch.set_num_threads(n)
                t_step = time.perf_counter()
                x, y = batches(cfg["batch_size"])  # [B, T] token ids, [B, T] targets (-100: no loss)
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, cfg)
                with _autocast(cfg["precision"]):
                    logits = model(input_ids=x).logits  # [B, T, V]
                loss = torch.nn.functional.cross_entropy(
                    logits.float().flatten(0, 1), y.flatten(), ignore_index=-100
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                gov.record(step, n, time.perf_counter() - t_step)
                if callback is not None and callback_every and (step + 1) % callback_every == 0:
                    callback(step + 1, model)
                    model.train()
                if step % log_every == 0 or step == cfg["steps"] - 1:
                    v = loss.item()
                    loss_ema = v if loss_ema is None else 0.7 * loss_ema + 0.3 * v
                    bar.update(completed=step + 1, loss=loss_ema)
        train_s = time.perf_counter() - t0
    model.eval()
    stats = {
        "steps": cfg["steps"],
        "final_loss": loss_ema,
        "train_s": round(train_s, 2),
        "n_params": sum(p.numel() for p in model.parameters()),
        "num_threads": gov.n,
        "thread_switches": [list(x) for x in gov.switches],  # [step, threads]; empty on an idle machine
        "final_threads": gov.mode,
    }
    return model, stats
