"""Regularisers composable with any method (config group `reg`): a term the loop adds to the training loss.

- `kl`: weight · KL(p_tuned ‖ p_base), the mean over the batch's response tokens (the tokens the task loss is on),
  with p_base from a frozen copy of the model taken before the method prepared it (so it is the original base
  even for inits that rewrite base weights, such as PiSSA). Costs one extra forward per batch and the memory of
  a second model copy (no gradients, no optimizer state). Methods whose model equals the base at step 0 (full,
  LoRA and its zero-init variants, IA3, the freezing methods) have KL exactly 0 at step 0.
- `l2sp`: weight · ½ Σ‖θ − θ₀‖² over the trained parameters (L2-SP, Li et al., 2018, arXiv:1802.01483), θ₀ the
  values when training starts: the pretrained weights for full/freeze/hft/lisa, the initial adapter for
  adapter methods. A parameter that starts training later (LISA) is anchored when it first requires grad,
  which is its untouched pretrained value. Exactly 0 at step 0.

The pipeline builds the regulariser from `cfg.reg` (`build_regulariser`), calls `capture_base` before
`method.prepare` and `capture_start` after it, and passes it to `ftlab.train.loop.train`, whose loop adds
`reg(model, batch, outputs)` to the loss in one place and logs its mean as `reg` in metrics.jsonl. `outputs` is a
ftlab.train.loop.HeadOutputs: the final hidden states and the output head (ftlab.models.logits, applied in chunks
for a large vocabulary), `.logits` when the whole logits are wanted.
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

    def __init__(self, weight: float):
        self.weight = float(weight)

    def capture_base(self, model: nn.Module) -> None:
        """Called with the loaded base model, before the method prepares it."""

    def capture_start(self, model: nn.Module) -> None:
        """Called with the prepared model, before the first step."""

    def value(self, model: nn.Module, batch: dict, outputs: Any) -> torch.Tensor:
        """The unweighted term."""
        raise NotImplementedError

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

    def capture_base(self, model: nn.Module) -> None:
        self.ref = copy.deepcopy(model).eval()
        for p in self.ref.parameters():
            p.requires_grad_(False)

    def value(self, model: nn.Module, batch: dict, outputs: Any) -> torch.Tensor:
        import torch

        from ftlab.models.logits import head_split

        with torch.no_grad(), head_split(self.ref) as ref_head:
            ref = self.ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_kl(outputs.hidden, ref, batch["labels"], head=outputs.head, ref_head=ref_head)


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

    def capture_start(self, model: nn.Module) -> None:
        self.anchors: dict[str, torch.Tensor] = {}
        self._anchor_new(model)

    def state_dict(self) -> dict:
        return {"anchored": list(self.anchors)}  # names in anchoring order (the order of the sum)

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        """Anchors are values before a parameter first trained: the fresh model's, taken before the checkpoint's
        weights are loaded, in the saved order."""
        params = dict(model.named_parameters())
        self.anchors = {n: params[n].detach().clone() for n in state["anchored"]}

    def _anchor_new(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if p.requires_grad and n not in self.anchors:
                self.anchors[n] = p.detach().clone()

    def value(self, model: nn.Module, batch: dict, outputs: Any) -> torch.Tensor:
        self._anchor_new(model)
        params = dict(model.named_parameters())
        import torch

        total = outputs.hidden.new_zeros((), dtype=torch.float32)
        for n, a in self.anchors.items():
            total = total + (params[n].float() - a.float()).pow(2).sum()
        return 0.5 * total


def build_regulariser(cfg: Any) -> Regulariser | None:
    """From the `reg` config section; None for kind=none."""
    if cfg is None or cfg.kind == "none":
        return None
    return REGULARISERS.get(cfg.kind)(cfg.weight)
