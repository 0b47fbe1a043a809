"""Pretraining the world's base model: seeded batches of the pretraining skills, AdamW with warmup and cosine
decay, on one intra-op thread (the same weights on any machine)."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Iterator, Optional

import torch

from ftlab.utils.padding import pad_batch
from ftlab.utils.progress import Bar
from ftlab.world import skills as sk
from ftlab.world.model import build_model, world_config
from ftlab.world.tokenizer import build_tokenizer

# One intra-op thread, always: the thread count changes float summation order in backward reductions (weights after
# 100 steps differed by 2.4e-7 between 1 and 2 threads), so a pinned count makes the base model the same bits on
# any machine. Measured at d=64, batch 96: ~33 ms per step on 1 thread, ~25 ms on 2 of an idle 2-core CPU, but
# 0.9-2.5 s on 2 threads when another process keeps a core busy (each parallel region waits for the descheduled
# thread); the world's budget (WorldConfig) is sized for one thread.
THREADS = 1


WEIGHT_DECAY = 0.01


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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
    with _threads(THREADS):
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
        with Bar(cfg["steps"], f"[bold]pretraining {cfg['size']} world", "loss {task.fields[loss]:.4f}", enabled=progress,
                 loss=float("nan")) as bar:
            for step in range(cfg["steps"]):
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
        "num_threads": THREADS,
    }
    return model, stats
