"""Regularisers composable with any method (config group `reg`).

- `kl`: weight · KL(p_tuned ‖ p_base), added to the loss: the mean over response tokens, p_base from a frozen copy of
  the model taken before the method prepared it (so it is the original base even for inits that rewrite base
  weights, such as PiSSA). `reg.kl_on` says on which rows: `task`, the training batch's (the tokens the task loss is
  on); `mix`, a batch of general rows as large as the training batch, drawn in a seeded order from the source
  data.mix replays (`data.mix_source`, or the tiny world's pretraining skills; data.mix itself may stay 0), the
  "KL on other distributions keeps skills" arm; `both`, the sum of the two. Costs one extra forward of the base per
  batch (mix: and a forward and backward of the tuned model on the general rows) and the memory of a second model
  copy (no gradients, no optimizer state). Methods whose model equals the base at step 0 have KL exactly 0 then.
- `l2sp`: L2-SP (Li et al., 2018, arXiv:1802.01483) in the decoupled form under AdamW (Loshchilov & Hutter): not a
  loss term, which Adam would rescale per coordinate, but after every optimizer step the weight change ΔW moves
  toward the start, ΔW <- (1 - lr · weight) ΔW, like AdamW's weight decay toward θ0 instead of 0. `lr` is the
  parameter's own learning rate at that step (schedule and lr_scale included). ΔW is measured on the weights, not
  on the trained factors:
  - weights trained in place (full, freeze, HFT, LISA, OwLore) and LIFT's / S2FT's deltas: θ <- θ0 + (1 - c)(θ - θ0),
    exact (c = lr · weight);
  - LoRA-style adapters (peft lora_A / lora_B, any init): ΔW = s(BA - B0A0) against the initial adapter (zero for
    plain LoRA; PiSSA/CorDA/LoRA-GA start with the rewritten base + B0A0 = W). B takes the least-squares step that
    shrinks ΔW by (1 - c) within A's row space, B <- B - c (B - B0 A0 A^T (A A^T)^-1): exact for plain LoRA
    (B <- (1 - c) B); A is left to the task. Not ‖A - A0‖² + ‖B - B0‖², which pulls A to its random init;
  - scaling vectors (IA3, SSF, DoRA's magnitude) and soft prompts: their own change, θ <- θ0 + (1 - c)(θ - θ0) (for
    IA3 and SSF scales ΔW is linear in it, so ΔW shrinks by (1 - c) too).
  Normalisation: `weight` is a decay rate per unit learning rate, so one weight means the same for every model size
  and parameter count (a sum of squares over the model would not); under Adam, whose steps are ~lr per coordinate,
  it bounds each entry's drift near 1 / weight. Logged as `reg`: weight · ½ · the mean of ΔW² over the measured
  weight entries (not added to the loss). A parameter that starts training later (LISA) is anchored when it first
  requires grad, at its untouched pretrained value. Exactly 0 at step 0.

The pipeline builds the regulariser from `cfg.reg` (`build_regulariser`), calls `capture_base` before
`method.prepare` and `capture_start` after it (with the method's context: tokenizer, data config, seed, max
length), and passes it to `ftlab.train.loop.train`, whose loop calls `reg(model, batch, outputs)` on every
micro-batch, adds it to the loss when `in_loss`, logs its mean as `reg` in metrics.jsonl, and calls
`after_step(model, optimizer)` after each optimizer step. `outputs` is a ftlab.train.loop.HeadOutputs: the final
hidden states and the output head (ftlab.models.logits, applied in chunks for a large vocabulary), `.logits` when
the whole logits are wanted.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from ftlab.config.reg import REGULARISERS

if TYPE_CHECKING:  # torch is imported where it is used: discovering the registry at validation stays torch-free
    import torch
    from torch import nn


class Regulariser:
    kind = "none"
    in_loss = True  # the loop adds __call__'s term to the loss; False: it is only logged (decoupled L2-SP)

    def __init__(self, weight: float, cfg: Any = None):
        self.weight = float(weight)
        self.cfg = cfg

    def capture_base(self, model: nn.Module) -> None:
        """Called with the loaded base model, before the method prepares it."""

    def capture_start(self, model: nn.Module, ctx: Any = None) -> None:
        """Called with the prepared model (and the method's context: tokenizer, data, seed), before the first step."""

    def value(self, model: nn.Module, batch: dict, outputs: Any) -> torch.Tensor:
        """The unweighted term."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, optimizer: Any) -> None:
        """After each optimizer step (decoupled updates)."""

    def state_dict(self) -> dict:
        """What changes during training (saved in training-state checkpoints; plain values only)."""
        return {}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        """On resume: called with the freshly prepared model, before the checkpoint's weights are loaded."""

    def __call__(self, model: nn.Module, batch: dict, outputs: Any) -> torch.Tensor:
        return self.weight * self.value(model, batch, outputs)


REGULARISERS.register("none", Regulariser)  # no term: build_regulariser returns None


@REGULARISERS.register("kl")
class KLToBase(Regulariser):
    kind = "kl"
    POOL = 2048  # general rows drawn once (seeded) and cycled through in a seeded order (kl_on: mix | both)

    @property
    def on(self) -> str:
        return getattr(self.cfg, "kl_on", "task") if self.cfg is not None else "task"

    def capture_base(self, model: nn.Module) -> None:
        self.ref = copy.deepcopy(model).eval()
        for p in self.ref.parameters():
            p.requires_grad_(False)

    def capture_start(self, model: nn.Module, ctx: Any = None) -> None:
        self.pos = 0
        if self.on == "task":
            return
        if ctx is None or getattr(ctx, "data", None) is None:
            raise ValueError(f"reg.kl_on={self.on}: the KL on general rows needs the run's data config and tokenizer")
        import random

        from ftlab.data.sources import general_rows
        from ftlab.train.batches import encode_example

        rows = general_rows(ctx.data, self.POOL, ctx.seed)
        self.general = [encode_example(ctx.tokenizer, r["prompt"], r["response"], ctx.max_length) for r in rows]
        self.order = list(range(len(self.general)))
        random.Random(f"kl_on:{ctx.seed}").shuffle(self.order)
        pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
        self.pad = 0 if pad is None else pad

    def state_dict(self) -> dict:
        return {"pos": getattr(self, "pos", 0)}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        self.pos = int(state.get("pos", 0))

    def _general_batch(self, n: int, device) -> dict:
        from ftlab.train.batches import collate

        rows = [self.general[self.order[(self.pos + k) % len(self.order)]] for k in range(n)]
        self.pos += n
        return {k: v.to(device) for k, v in collate(rows, self.pad).items()}

    def _kl(self, hidden, head, batch: dict, fused: bool = False):
        import torch

        from ftlab.models.logits import head_split

        with torch.no_grad(), head_split(self.ref) as ref_head:
            ref = self.ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if fused:  # hw.kernels: kernels/fused_ce.py where both heads are plain linears
            from ftlab.train.fused_loss import fusable, fused_token_kl

            if fusable(head, kl=True) and fusable(ref_head, kl=True):
                return fused_token_kl(hidden, ref, batch["labels"], head, ref_head)
        return token_kl(hidden, ref, batch["labels"], head=head, ref_head=ref_head)

    def value(self, model: nn.Module, batch: dict, outputs: Any) -> torch.Tensor:
        from ftlab.models.logits import head_split

        total = None
        if self.on in ("task", "both"):
            total = self._kl(outputs.hidden, outputs.head, batch, fused=getattr(outputs, "kernels", False))
        if self.on in ("mix", "both"):
            g = self._general_batch(batch["input_ids"].shape[0], batch["input_ids"].device)
            with head_split(model) as head:
                hidden = model(input_ids=g["input_ids"], attention_mask=g["attention_mask"]).logits
            term = self._kl(hidden, head, g, fused=getattr(outputs, "kernels", False))
            total = term if total is None else total + term
        return total


def _kl_rows(lp_logits: torch.Tensor, lq_logits: torch.Tensor) -> torch.Tensor:
    import torch

    lp, lq = torch.log_softmax(lp_logits, dim=-1), torch.log_softmax(lq_logits, dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, head: nn.Module | None = None,
             ref_head: nn.Module | None = None, chunk: int | None = None) -> torch.Tensor:
    """Mean over response positions of KL(softmax(logits) ‖ softmax(ref_logits)), aligned as the task loss is
    (logits at t predict labels at t+1). Exactly 0 when the logits are equal.

    With `head` / `ref_head` (ftlab.models.logits.head_split), `logits` / `ref_logits` are final hidden states and
    the heads are applied here: at once while the [positions x vocabulary] logits fit `chunk` positions (the same ops
    as with logits given), else over the response positions only, `chunk` at a time, the model's side recomputed
    in backward (torch.utils.checkpoint): the same per-token KL, the whole logits never held."""
    import torch

    from ftlab.models.logits import chunk_positions, map_tokens, vocab_size
    from ftlab.train.batches import IGNORE

    mask = labels[:, 1:] != IGNORE
    if chunk is None:
        chunk = chunk_positions(vocab_size(head) if head is not None else logits.shape[-1])
    if (head is None and ref_head is None) or mask.numel() <= chunk:
        if head is not None:
            logits = head(logits)
        if ref_head is not None:
            ref_logits = ref_head(ref_logits)
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)[mask]
        lq = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)[mask]
        if lp.numel() == 0:
            return logits.sum() * 0.0
        return (lp.exp() * (lp - lq)).sum(-1).mean()
    rows, ref_rows = logits[:, :-1][mask], ref_logits[:, :-1][mask]
    if rows.shape[0] == 0:
        return rows.sum() * 0.0

    def kl(lg: torch.Tensor, ref_h: torch.Tensor) -> torch.Tensor:  # one chunk: the reference's logits beside it
        with torch.no_grad():
            lq = (ref_h if ref_head is None else ref_head(ref_h)).float()
        return _kl_rows(lg, lq)

    return map_tokens(rows, head, kl, ref_rows.detach(), chunk=chunk, checkpoint=True).mean()


@REGULARISERS.register("l2sp")
class L2SP(Regulariser):
    kind = "l2sp"
    in_loss = False  # decoupled: applied to the weights after each step, logged only

    def capture_start(self, model: nn.Module, ctx: Any = None) -> None:
        self.anchors: dict[str, torch.Tensor] = {}
        self._anchor_new(model)

    def state_dict(self) -> dict:
        return {"anchored": list(self.anchors)}  # names in anchoring order

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        """Anchors are values before a parameter first trained: the fresh model's, taken before the checkpoint's
        weights are loaded, in the saved order."""
        params = dict(model.named_parameters())
        self.anchors = {n: params[n].detach().clone() for n in state["anchored"]}

    def _anchor_new(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if p.requires_grad and n not in self.anchors:
                self.anchors[n] = p.detach().clone()

    def _pairs(self, model: nn.Module) -> tuple[list[tuple], set[str]]:
        """LoRA-style adapters [(module name, adapter, A name, B name, scale, d_out * d_in)] and the names of the
        parameters they cover."""
        out, covered = [], set()
        names = {id(p): n for n, p in model.named_parameters()}
        for mname, m in model.named_modules():
            la, lb = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
            if not hasattr(la, "keys") or not hasattr(lb, "keys") or not hasattr(m, "scaling"):
                continue
            for key in la.keys():
                if key not in lb or not hasattr(la[key], "weight"):
                    continue
                a, b = names.get(id(la[key].weight)), names.get(id(lb[key].weight))
                if a in self.anchors and b in self.anchors:
                    base = getattr(m, "base_layer", m)
                    size = base.weight.numel() if hasattr(base, "weight") else lb[key].weight.shape[0] * \
                        la[key].weight.shape[1]
                    out.append((mname, key, a, b, float(m.scaling[key]), size))
                    covered |= {a, b}
        return out, covered

    @staticmethod
    def _lora_dw2(a, b, a0, b0, s: float):
        """‖s(BA - B0A0)‖²_F through r x r Gram matrices (no d_out x d_in product)."""
        aa, a0a0, aa0 = a @ a.T, a0 @ a0.T, a @ a0.T
        return s * s * ((b.T @ b * aa).sum() - 2 * (b.T @ b0 * aa0).sum() + (b0.T @ b0 * a0a0).sum())

    def value(self, model: nn.Module, batch: dict, outputs: Any) -> torch.Tensor:
        """½ the mean of ΔW² over the measured weight entries (logged only)."""
        import torch

        self._anchor_new(model)
        params = dict(model.named_parameters())
        pairs, covered = self._pairs(model)
        with torch.no_grad():
            total = torch.zeros((), dtype=torch.float64)
            entries = 0
            for _, _, an, bn, s, size in pairs:
                dw2 = self._lora_dw2(params[an].double(), params[bn].double(), self.anchors[an].double(),
                                     self.anchors[bn].double(), s)
                total += dw2.cpu().clamp_min(0)
                entries += size
            for n, a0 in self.anchors.items():
                if n not in covered:
                    total += (params[n].detach().double() - a0.double()).pow(2).sum().cpu()
                    entries += a0.numel()
        return (0.5 * total / max(entries, 1)).float().to(outputs.hidden.device)

    def after_step(self, model: nn.Module, optimizer: Any) -> None:
        """ΔW <- (1 - lr · weight) ΔW, at each parameter's own learning rate (module docstring)."""
        import torch

        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        params = dict(model.named_parameters())
        pairs, covered = self._pairs(model)
        with torch.no_grad():
            for _, _, an, bn, _, _ in pairs:
                a, b = params[an], params[bn]
                c = min(1.0, lr_of.get(id(b), 0.0) * self.weight)
                if c <= 0:
                    continue
                a32, a0, b0 = a.float(), self.anchors[an].float(), self.anchors[bn].float()
                # the B that shrinks s(BA - B0A0) by (1 - c) in A's row space: G = B - B0 A0 A^T (A A^T)^+
                g = b.float() - b0 @ (a0 @ a32.T) @ torch.linalg.pinv(a32 @ a32.T)
                b.sub_((c * g).to(b.dtype))
            for n, a0 in self.anchors.items():
                p = params[n]
                if n in covered or not p.requires_grad:
                    continue
                c = min(1.0, lr_of.get(id(p), 0.0) * self.weight)
                if c > 0:
                    p.sub_(c * (p - a0.to(p.device, p.dtype)))


def build_regulariser(cfg: Any) -> Regulariser | None:
    """From the `reg` config section; None for kind=none."""
    if cfg is None or cfg.kind == "none":
        return None
    return REGULARISERS.get(cfg.kind)(cfg.weight, cfg)
