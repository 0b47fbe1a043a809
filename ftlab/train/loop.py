"""The one training loop. Methods plug in through the hooks of ftlab.methods.Method; nothing forks the loop."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ftlab.config.schema import RunConfig, TrainConfig
from ftlab.methods.base import Method, count_params
from ftlab.models.logits import fits_at_once, head_split, vocab_size
from ftlab.train import distributed as dist
from ftlab.train import precision as mixed
from ftlab.train import preempt
from ftlab.train.batches import (
    Batches,
    collate,
    micro_batches,
    pack,
    response_loss,
    response_tokens,
)
from ftlab.train.errors import NonFiniteLoss
from ftlab.train.fused_loss import fusable, fused_response_loss
from ftlab.utils.memory import peak_bytes
from ftlab.utils.progress import Bar

# ------------------------------------------------------------------------------------------------ tokenizing


# ---------------------------------------------------------------------------------------------------- loop
@dataclass
class TrainResult:
    steps: int
    tokens: int
    tokens_per_s: float
    peak_mem_bytes: int
    trainable_params: int
    total_params: int
    wall_s: float
    final_loss: float
    # peak over training of the bytes held in optimizer.state tensors (Adam moments, GaLore projections, ...),
    # measured after each optimizer step (a resumed run counts from its resume point)
    optimizer_state_bytes: int = 0
    method: dict = field(default_factory=dict)  # Method.report(): run-time choices of the method


def autocast(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


@dataclass(frozen=True)
class LoopSettings:
    """What the loop reads of a run's config: the train group, the seed and two hw knobs (ftlab.pipeline builds
    it with `LoopSettings.of(cfg)`); the loop never sees the rest."""

    train: TrainConfig
    seed: int
    precision: str = "fp32"  # hw.precision: autocast dtype of the forward
    micro_batch_size: Optional[int] = None  # hw.micro_batch_size: rows per forward on a process
    # data.packing: each micro-batch's rows packed into sequences of pack_length (model.max_length) tokens
    packing: bool = False
    pack_length: Optional[int] = None
    compile: bool = False  # hw.compile: the training forward through torch.compile
    kernels: bool = False  # hw.kernels: the loss through ftlab.kernels.fused_ce (ftlab.train.fused_loss)

    @classmethod
    def of(cls, cfg: RunConfig) -> "LoopSettings":
        return cls(train=cfg.train, seed=cfg.seed, precision=cfg.hw.precision,
                   micro_batch_size=cfg.hw.micro_batch_size, packing=cfg.data.packing,
                   pack_length=cfg.model.max_length, compile=cfg.hw.compile,
                   kernels=cfg.hw.kernels)


@dataclass
class HeadOutputs:
    """What a regulariser gets of the training forward: the final hidden states and the output head
    (ftlab.models.logits.head_split; `head` None: `hidden` holds the logits), and the model's own output."""

    hidden: torch.Tensor
    head: Optional[nn.Module]
    raw: Any = None
    kernels: bool = False  # hw.kernels: a regulariser may use ftlab.kernels (reg=kl: ftlab.train.fused_loss)

    @property
    def logits(self) -> torch.Tensor:
        """The whole logits (materialised: [tokens x vocabulary]); chunked code uses hidden and head."""
        return self.hidden if self.head is None else self.head(self.hidden)


def forward_backward(model: nn.Module, rows: list[dict], settings: LoopSettings, *, device: str, pad_id: int,
                     forward: nn.Module | None = None, reg: Callable | None = None, step: int = 0,
                     ) -> tuple[list[float], list[float]]:
    """Forward and backward of one global batch (`rows`, the same on every rank): this rank's rows `rank::world`, in
    hw.micro_batch_size micro-batches; gradients accumulate into `.grad`, divided by train.grad_accum.

    Each micro-batch's loss is its share of the batch's mean over response tokens (its response tokens / the batch's,
    times the world size, which DDP/FSDP average away), so any split gives the un-split batch's loss and gradient up
    to float summation order; a micro-batch without response tokens contributes exactly zero loss and zero gradient.
    Returns, per micro-batch, the loss and the regulariser's share, each summed over ranks."""
    rank, world, _ = dist.world()
    fwd = forward if forward is not None else model
    n_resp = response_tokens(rows)
    parts = micro_batches(rows[rank::world], settings.micro_batch_size)
    losses, regs = [], []
    for i, chunk in enumerate(parts):
        packed = pack(chunk, max(settings.pack_length or 0, *(len(r["input_ids"]) for r in chunk)), pad_id) \
            if settings.packing else None
        batch = {k: v.to(device) for k, v in (packed or collate(chunk, pad_id)).items()}
        # This chunk's share of the global batch's mean loss, times `world` because DDP/FSDP average gradients over
        # ranks: the averaged gradient is the one-process one. One process, one chunk: both factors are exactly 1.0,
        # so the loss is bit for bit the plain mean.
        n_chunk = response_tokens(chunk)
        tok_w = n_chunk / max(n_resp, 1) * world
        row_w = len(chunk) / len(rows) * world
        reg_value = None
        with autocast(device, settings.precision):
            # the output head applied in chunks (ftlab.models.logits): the loss never holds the whole logits. Only the
            # forward runs with the head split off; the model is whole again for the loss and the regulariser.
            with head_split(model) as head:
                out = fwd(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                          # with a KV cache, transformers ignores restarting position ids: rows would see each other
                          **({"position_ids": batch["position_ids"], "use_cache": False} if packed else {}))
            hidden = out.logits
            fused = settings.kernels and fusable(head)
            if not fused and head is not None and fits_at_once(hidden.shape[0] * hidden.shape[1], vocab_size(head)):
                hidden, head = head(hidden), None  # small: the whole logits once, shared by loss and regulariser
            task = fused_response_loss(hidden, batch["labels"], head) if fused else \
                response_loss(hidden, batch["labels"], head=head)
            loss = task * tok_w
            if reg is not None:
                reg_term = reg(model, batch, HeadOutputs(hidden, head, out, kernels=settings.kernels))
                if reg.in_loss:  # decoupled regularisers act in after_step; logged only
                    loss = loss + reg_term * row_w
                reg_value = reg_term.item()
                regs.append(dist.all_sum(reg_value * row_w / world))
        local = loss.item()
        loss_all = dist.all_sum(local / world)  # every rank sees a NaN anywhere
        if not math.isfinite(loss_all):
            raise NonFiniteLoss(_nan_message(step, loss_all, local, task.item(), reg_value, i, len(parts), n_chunk,
                                             n_resp, settings))
        (loss / settings.train.grad_accum).backward()
        losses.append(loss_all)
    return losses, regs


def _nan_message(step: int, loss_all: float, local: float, task: float, reg_value: Optional[float], i: int,
                 n_parts: int, n_chunk: int, n_resp: int, settings: LoopSettings) -> str:
    """What happened, said as it is: where, which term, whether the batch had response tokens, and what helps."""
    where = f"loss is {loss_all} at step {step} (micro-batch {i + 1} of {n_parts} of this process)"
    if math.isfinite(local):
        what = [f"this process's loss is finite ({local:.6g}): another process's was not"]
    else:
        what = [f"the response-token loss is {task}"]
        if reg_value is not None:
            what.append(f"the regulariser's term is {reg_value}")
    what.append(f"this micro-batch has {n_chunk} of the batch's {n_resp} response tokens"
                + (" (none in the whole batch: every row's answer was cut; raise model.max_length)"
                   if n_resp == 0 else ""))
    t = settings.train
    if step <= 1:
        why = ("this is the first step, before any update, so not the learning rate: the model's forward is not "
               "finite on this batch (the loaded weights" + (f", or an overflow in hw.precision={settings.precision}: "
                                                            "try hw.precision=fp32)" if settings.precision != "fp32"
                                                            else ")"))
    else:
        why = (f"after {step - 1} updates the weights diverged: lower train.lr (now {t.lr:g})"
               + (f", set train.max_grad_norm (now {t.max_grad_norm:g})" if t.max_grad_norm <= 0 else "")
               + (", or use hw.precision=fp32" if settings.precision != "fp32" else ""))
    return f"{where}: {'; '.join(what)}; {why}"


def train(model: nn.Module, method: Method, batches: Batches, settings: LoopSettings, *, device: str, pad_id: int,
          run_dir: Path, on_log: Callable[[dict], None] | None = None, progress: bool = True,
          reg: Callable[[nn.Module, dict, Any], torch.Tensor] | None = None,
          resume_from: Any = None, probes: Any = None, forward: nn.Module | None = None, step_offset: int = 0,
          stage: int | None = None, curve: Any = None) -> TrainResult:
    """Train `model` (already prepared by the method) for settings.train.max_steps optimizer steps.

    Every train.save_every steps (and after the last step) a training-state checkpoint goes to
    run_dir/checkpoints/step_NNNNNN (ftlab.train.checkpoint); `resume_from` (an ftlab.train.checkpoint.Loaded) continues
    from one exactly: weights, optimizer, scheduler, RNG, data position, method state, curve accumulators.

    `reg` (an ftlab.train.regularisers.Regulariser, or None) adds its term to the loss (unless its `in_loss` is
    false) and its `after_step` runs after each optimizer step; the term's mean is logged as `reg`.
    A param group may carry `lr_scale` (layer-wise LR decay): its lr is train.lr times that.

    `probes` (an ftlab.eval.probes.Probes with its base captured, or None): a step-0 row with the base's numbers,
    then probe_ppl / probe_kl every `probes.every` steps and at the last step, on the curve's rows (a probed
    step is always logged). Probes run in eval mode under inference_mode and draw no random numbers, so the
    training itself is the same with or without them. Continual stages (ftlab.pipeline): `step_offset` shifts
    the curve's steps (and checkpoint names) past the earlier stages, `stage` tags the rows.

    `curve` (an ftlab.eval.curve.Curve, or None; rank 0): the target and forgetting tasks scored at step 0 (the
    base) and every `curve.every` steps into curve.jsonl, likewise without touching the training's randomness."""
    from transformers import get_scheduler

    t = settings.train
    torch.manual_seed(settings.seed)
    rank, world, _ = dist.world()
    main = rank == 0  # rank 0 alone writes the curve, logs and checkpoints (ftlab.train.distributed)
    groups = method.param_groups(model, t.weight_decay)
    # hw.precision bf16/fp16: the trained weights are float32 masters (ftlab.train.precision), back after training
    mixed.to_master([p for g in groups for p in g["params"]], settings.precision)
    half = sorted({str(p.dtype) for g in groups for p in g["params"] if p.dtype in mixed.HALF})
    if half and main:  # hw.precision=fp32 on weights loaded in a half type: no autocast, no masters
        print(f"ftlab: warning: the trained weights are {', '.join(half)} and hw.precision={settings.precision}: "
              "AdamW updates them in that type, where most small updates round away; set hw.precision=bf16 "
              "(float32 master weights) or model.dtype=float32", file=sys.stderr)
    lr = method_lr(method.cfg, t.lr)
    if lr != t.lr and main:
        print(f"ftlab: method={method.name} trains at lr {lr:g} = train.lr {t.lr:g} x method.lr_scale "
              f"{lr / t.lr:g}", file=sys.stderr)
    for g in groups:
        g["lr"] = lr * g.pop("lr_scale", 1.0)
    opt = method.build_optimizer(groups, lr=lr, betas=(t.adam_beta1, t.adam_beta2))
    if not any(p.requires_grad for g in opt.param_groups for p in g["params"]):
        raise ValueError(f"method {method.name}: no trainable parameters")
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.schedule]
    sched = get_scheduler(schedule, opt, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
    trainable, total = count_params(model)
    curve_path = run_dir / "metrics.jsonl"
    model.train()
    if settings.packing:
        check_packing(model)
    if settings.compile:
        # the training forward only: evaluation, probes and the curve call `model`, whose shapes vary far more
        forward = torch.compile(forward if forward is not None else model)

    tokens = 0
    window_loss, window_n, loss_value = 0.0, 0, float("nan")
    window_reg = 0.0
    start, elapsed0 = 1, 0.0
    if resume_from is not None:
        from ftlab.train.checkpoint import restore

        p = restore(resume_from, model=model, optimizer=opt, scheduler=sched, method=method, batches=batches,
                    reg=reg, probes=probes)
        start, tokens, elapsed0 = p["step"] + 1, p["tokens"], p["elapsed_s"]
        window_loss, window_n, window_reg, loss_value = p["window_loss"], p["window_n"], p["window_reg"], \
            p["loss_value"]
    # a fresh start drops every row (a stale step-0 probe row too); a resume or a later stage keeps what came before
    if main:
        _truncate_curve(curve_path, step_offset + start - 1 if start > 1 or step_offset else -1)
    probe_every = getattr(probes, "every", 0) if probes is not None else 0
    save_every, keep = t.save_every, getattr(t, "keep_checkpoints", 2)
    t0 = time.perf_counter() - elapsed0
    opt_state_peak = optimizer_state_bytes(opt)  # a resumed optimizer already holds state
    bar = Bar(t.max_steps, "train", "loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s",
              enabled=progress and main, loss=float("nan"), tps=0.0)
    if curve is not None and main:
        with autocast(device, settings.precision):
            curve.start(model, None if start == 1 and step_offset == 0 else step_offset + start - 1)
    with open(curve_path if main else os.devnull, "a") as curve_file, bar, preempt.deferred():
        if probes is not None and start == 1 and step_offset == 0:  # step 0 = the base model
            row0 = {"step": 0, "loss": None, **probes.base_row()}
            curve_file.write(json.dumps(row0) + "\n")
            if on_log is not None and main:
                on_log(row0)
        for step in range(start, t.max_steps + 1):
            step_loss = 0.0
            for _ in range(t.grad_accum):
                rows = batches.next()  # the global batch: the same on every rank
                tokens += sum(len(r["input_ids"]) for r in rows)
                losses, regs = forward_backward(model, rows, settings, device=device, pad_id=pad_id, forward=forward,
                                                reg=reg, step=step)
                for x in regs:
                    window_reg += x / t.grad_accum
                for x in losses:
                    step_loss += x / t.grad_accum
            grad_norm = None
            if t.max_grad_norm > 0:
                grad_norm = float(dist.full_tensor(torch.nn.utils.clip_grad_norm_(
                    [p for g in opt.param_groups for p in g["params"]], t.max_grad_norm)))
                if not math.isfinite(grad_norm):
                    raise NonFiniteLoss(
                        f"gradient norm is {grad_norm} at step {step} while the loss was finite ({step_loss:.6g}): "
                        "the backward overflowed" + (" before any update" if step == 1 else "")
                        + (f" (hw.precision={settings.precision}: try hw.precision=fp32)"
                           if settings.precision != "fp32" else "") + f"; or lower train.lr (now {t.lr:g})")
            opt.step()
            if reg is not None:
                reg.after_step(model, opt)  # decoupled updates (L2-SP), at the lr this step used
            opt_state_peak = max(opt_state_peak, optimizer_state_bytes(opt))
            sched.step()
            opt.zero_grad(set_to_none=True)
            method.on_step_end(model, opt, step)

            loss_value = step_loss
            window_loss, window_n = window_loss + step_loss, window_n + 1
            elapsed = time.perf_counter() - t0
            bar.update(completed=step, loss=loss_value, tps=tokens / max(elapsed, 1e-9))
            probe_now = probe_every > 0 and (step % probe_every == 0 or step == t.max_steps)
            if step % t.log_every == 0 or step == t.max_steps or probe_now:
                row = {"step": step_offset + step, "loss": window_loss / window_n, "lr": sched.get_last_lr()[0],
                       "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / max(elapsed, 1e-9),
                       "elapsed_s": elapsed}
                if reg is not None:
                    row["reg"] = window_reg / window_n
                if stage is not None:
                    row["stage"] = stage
                if probe_now:
                    tp = time.perf_counter()
                    with autocast(device, settings.precision):  # the trained weights may be float32 masters
                        row.update(probes(model))
                    row["probe_s"] = time.perf_counter() - tp
                curve_file.write(json.dumps(row) + "\n")
                curve_file.flush()
                if on_log is not None and main:
                    on_log(row)
                window_loss, window_n, window_reg = 0.0, 0, 0.0
            if curve is not None and main and curve.due(step, t.max_steps):
                with autocast(device, settings.precision):
                    scored = curve.record(model, step_offset + step)
                if on_log is not None:
                    on_log({"step": step_offset + step, "curve_gain": scored["gain"],
                            "curve_forgetting": scored["forgetting"]})
            # A stop signal (ftlab.train.preempt: SLURM preemption, time limit, requeue) is acted on here, at the step
            # boundary: checkpoint, then stop. In a SLURM job the last step is always saved, so a signal during
            # the tuned evaluation costs no training.
            stop = preempt.requested()  # the ranks agree on it (one collective), so they stop at the same step
            if (save_every and (step % save_every == 0 or step == t.max_steps)) or stop \
                    or (step == t.max_steps and preempt.installed()):
                from ftlab.train.checkpoint import prune, save_state

                save_state(run_dir / "checkpoints" / f"step_{step_offset + step:06d}", model=model, optimizer=opt,
                           scheduler=sched, method=method, batches=batches, run_dir=run_dir, reg=reg, probes=probes,
                           progress={"step": step, "stage": stage or 0, "tokens": tokens, "window_loss": window_loss,
                                     "window_n": window_n, "window_reg": window_reg, "loss_value": loss_value,
                                     "elapsed_s": time.perf_counter() - t0})
                if main:
                    prune(run_dir / "checkpoints", keep)
            if stop:
                raise preempt.Preempted(stop, step=step_offset + step, run_dir=run_dir,
                                        checkpoint=f"step_{step_offset + step:06d}")
    wall = time.perf_counter() - t0
    mixed.to_storage(model)  # masters back to the loaded dtype: the tuned model is evaluated as the base was
    return TrainResult(steps=t.max_steps, tokens=tokens, tokens_per_s=tokens / max(wall, 1e-9),
                       # peak since the pipeline's reset at the start of the training phase (ftlab.utils.memory)
                       peak_mem_bytes=peak_bytes(device), trainable_params=trainable, total_params=total,
                       wall_s=wall, final_loss=loss_value, optimizer_state_bytes=opt_state_peak,
                       method=method.report())


def check_packing(model: nn.Module) -> None:
    """data.packing relies on transformers building the attention mask from restarting position ids
    (masking_utils.create_causal_mask), which the modeling code of Llama, Qwen2/3, Mistral, Gemma and most current
    decoders calls; a model whose code does not would let packed rows attend to each other: refused."""
    m = getattr(model, "module", model)  # DDP
    m = m.get_base_model() if hasattr(m, "get_base_model") else m  # peft
    # the class's MRO: FSDP2's fully_shard swaps in a subclass defined outside transformers
    if not any(hasattr(sys.modules.get(c.__module__), "create_causal_mask") for c in type(m).__mro__):
        raise ValueError(f"data.packing: the model's code ({type(m).__module__}) does not build its attention mask "
                         "with transformers' create_causal_mask, so packed rows would attend to each other; set "
                         "data.packing=false")


def method_lr(method_cfg: Any, train_lr: float) -> float:
    """The base learning rate: train.lr times the method's `lr_scale` (> 1 for methods that train few
    parameters or only scale features, e.g. prompt tuning; 1 for the rest)."""
    return train_lr * float(getattr(method_cfg, "lr_scale", 1.0))


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer holds in `opt.state` (each tensor once), including tensors kept on
    objects in the state (GaLore's projector holds its projection matrix as an attribute)."""
    seen: set[int] = set()

    def walk(x: Any, depth: int = 0) -> int:
        if isinstance(x, torch.Tensor):
            if id(x) in seen:
                return 0
            seen.add(id(x))
            return x.numel() * x.element_size()
        if depth > 3:
            return 0
        if isinstance(x, dict):
            return sum(walk(v, depth + 1) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v, depth + 1) for v in x)
        if hasattr(x, "__dict__") and not isinstance(x, type):
            return sum(walk(v, depth + 1) for v in vars(x).values())
        return 0

    return sum(walk(s) for s in opt.state.values())


def _truncate_curve(path: Path, step: int) -> None:
    """metrics.jsonl holds rows up to `step` only (a resumed run re-logs what came after its checkpoint)."""
    if path.exists():
        from ftlab.train.checkpoint import truncate_curve

        truncate_curve(path, step)


