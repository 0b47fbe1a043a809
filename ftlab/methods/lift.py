"""LIFT: Low-rank Informed Sparse Fine-Tuning (Liu et al., 2025, "LIFT the Veil for the Truth: Principal Weights
Emerge after Rank Reduction for Reasoning-Focused Supervised Fine-Tuning", arXiv:2506.00772).

For every target matrix W of the transformer blocks: take its rank-`r` approximation W_r (truncated SVD), rank the
entries by |W_r| and let only the top k ("Principal Weights") train; everything else, the other entries, the
embeddings, norms and head, stays frozen. As the reference code (zihanghliu/LIFT src/sparseAdam.py, `update_masks`):
- the budget per matrix is LoRA-matched: k = min((d_in + d_out) * lora_rank, d_in * d_out), the entries a rank-
  `lora_rank` LoRA of that matrix would train (`sparsity = min((p.shape[0] + p.shape[1]) * lora_rank, ...)`), so
  thin matrices (k/v under grouped-query attention) get a higher density than wide ones. `percent` (null) instead
  trains that share of every matrix;
- the mask is re-selected every `update_interval` steps from the *current* weights (the SVD of W + its trained
  change), and the Adam moments of entries that stay selected are carried over, those of new entries start at zero
  (`prev_exp_avg[prev_mask] = state['exp_avg']` ... `state['exp_avg'] = prev_exp_avg[curr_mask]`); the step
  counter is kept. An entry that leaves the mask keeps its trained value (folded into the frozen weight) and stops
  training. `update_interval: 0` keeps the first mask. The reference's counter fires after step k*interval - 1;
  ftlab's after step k*interval.
Updates go through ftlab.methods._sparse: one trained vector per matrix, so the optimizer state holds moments for
the selected entries only (result.json `train.method.optimizer_state`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ftlab.config.bounds import at_least
from ftlab.config.registry import ConfigError
from ftlab.methods.base import ALL_LINEAR, METHODS, Method, MethodConfig, MethodContext

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class LiftConfig(MethodConfig):
    """LIFT: per matrix, the (d_in + d_out) * lora_rank largest entries of its rank-`r` approximation train; the
    selection is refreshed every `update_interval` steps."""

    name: str = "lift"
    r: int = 8  # rank of the approximation the entries are ranked by (the reference's filter_rank: 32-128)
    lora_rank: int = 8  # budget: (d_in + d_out) * lora_rank entries per matrix, a rank-lora_rank LoRA's count
    percent: Optional[float] = None  # instead of lora_rank: this share of each matrix's entries, in percent
    update_interval: int = 400  # steps between mask re-selections (the reference's 400; 0: keep the first mask)
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    svd_niter: Optional[int] = None  # None: exact SVD; k: torch.svd_lowrank (q = 2r) with k subspace iterations

    def check(self) -> None:
        super().check()
        at_least("method.r", self.r, 1)
        at_least("method.lora_rank", self.lora_rank, 1)
        if self.percent is not None and not 0 < self.percent <= 100:
            raise ConfigError(f"method.percent: must be in (0, 100] (a percentage of each matrix), or null for the "
                              f"LoRA-matched budget (method.lora_rank), got {self.percent!r}")
        at_least("method.update_interval", self.update_interval, 0)
        at_least("method.svd_niter", self.svd_niter, 1, allow_none=True)
        if not self.target_modules:
            raise ConfigError("method.target_modules: must name at least one module (e.g. q_proj)")

    def check_run(self, run: Any) -> None:
        """FSDP shards the trained vectors, which a mask re-selection rewrites in place."""
        h = run.hw
        if self.update_interval and h.strategy == "fsdp" and h.nproc * h.nnodes > 1:
            raise ConfigError("method.update_interval: LIFT re-selects its mask in place, which FSDP's sharded "
                              "vectors cannot follow; use hw.strategy=ddp, or method.update_interval=0 (a fixed mask)")

    def budget(self, d_out: int, d_in: int) -> int:
        """Entries that train in a (d_out, d_in) matrix."""
        if self.percent is not None:
            return max(1, round(self.percent / 100 * d_out * d_in))
        return min((d_in + d_out) * self.lora_rank, d_in * d_out)


def target_linears(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """{qualified name: module} of the linears inside the transformer blocks whose last name part is in `names`."""
    from torch import nn

    from ftlab.models.structure import decoder_layers

    prefix, layers = decoder_layers(model)
    out = {}
    for i, layer in enumerate(layers):
        for n, m in layer.named_modules():
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names:
                out[f"{prefix}.{i}.{n}"] = m
    if not out:
        raise ValueError(f"method.target_modules: none of {names} is a linear layer in the model's blocks")
    return out


def principal_indices(w: torch.Tensor, r: int, k: int, niter: int | None = None) -> torch.Tensor:
    """Flat indices (sorted) of the `k` largest entries of |rank-r approximation of w|."""
    import torch

    a = w.detach().float()
    r = min(r, min(a.shape))
    if niter is None:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        approx = (u[:, :r] * s[:r]) @ vh[:r]
    else:  # the reference's 'rand' masks: q = 2 * filter_rank, then the top filter_rank components
        u, s, v = torch.svd_lowrank(a, q=min(2 * r, min(a.shape)), niter=niter)
        approx = (u[:, :r] * s[:r]) @ v[:, :r].T
    return torch.topk(approx.abs().reshape(-1), min(k, a.numel())).indices.sort().values


@METHODS.register("lift", config=LiftConfig)
class Lift(Method):
    name = "lift"

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        from ftlab.methods._sparse import attach, deltas, selection_summary

        c = self.cfg
        selection = {n: principal_indices(m.weight, c.r, c.budget(*m.weight.shape), c.svd_niter)
                     for n, m in target_linears(model, c.target_modules).items()}
        attach(model, selection)
        self._deltas = deltas(model)  # {module name: its SparseDelta}: the masks live in their `index` buffers
        self.summary = selection_summary(model)
        self.updates: list[dict] = []  # one row per re-selection: step, entries kept
        self.folded: dict[str, torch.Tensor] = {}  # positions of entries that left a mask (their change is frozen)
        self._originals = {n: model.get_submodule(n).parametrizations.weight.original for n in self._deltas}
        return model

    def on_step_end(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self.cfg.update_interval and step % self.cfg.update_interval == 0:
            self.reselect(model, optimizer, step)

    def reselect(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> None:
        """New masks from the current weights (W + trained change); moments carried for kept entries."""
        import torch

        from ftlab.methods._sparse import move_support

        c = self.cfg
        kept = total = 0
        for name, sd in self._deltas.items():
            module = model.get_submodule(name)
            with torch.no_grad():
                new = principal_indices(module.weight, c.r, sd.index.numel(), c.svd_niter)
            kept += int(torch.isin(new, sd.index).sum())
            total += new.numel()
            pos, _ = move_support(module, new, optimizer)
            if pos.numel():  # positions whose frozen weight now holds a trained change
                prev = self.folded.get(name)
                pos = pos.cpu() if prev is None else torch.cat([prev, pos.cpu()])
                self.folded[name] = torch.unique(pos)
        self.updates.append({"step": step, "kept": kept, "of": total})

    def state_dict(self) -> dict:
        """The current masks, the frozen weights' values where entries left a mask (exact, not re-added), the log."""
        out = {"updates": [[u["step"], u["kept"], u["of"]] for u in self.updates],
               "index": {n: sd.index.detach().cpu().clone() for n, sd in self._deltas.items()},
               "folded_pos": {}, "folded_val": {}}
        for n, pos in self.folded.items():
            original = self._originals[n]
            out["folded_pos"][n] = pos.clone()
            out["folded_val"][n] = original.detach().reshape(-1)[pos.to(original.device)].cpu().clone()
        return out

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        """On a freshly prepared model (masks from the pretrained weights): the saved masks, and the changes of
        entries that left them folded back into the frozen weights."""
        import torch

        ds = self._deltas
        with torch.no_grad():
            for n, pos in state.get("folded_pos", {}).items():
                original = self._originals[n]
                original.view(-1)[pos.to(original.device)] = state["folded_val"][n].to(original.device,
                                                                                          original.dtype)
                self.folded[n] = pos.clone()
            for n, idx in state.get("index", {}).items():
                ds[n].index = idx.to(ds[n].index.device, torch.long)
        self.updates = [{"step": int(s), "kept": int(k), "of": int(o)} for s, k, o in state.get("updates", [])]

    def report(self) -> dict:
        c = self.cfg
        return {"optimizer_state": "sparse: AdamW moments for the selected entries only (one trained delta vector "
                                   "per matrix); the dense gradient of each matrix is still formed in backward",
                "budget": (f"{c.percent}% of each matrix" if c.percent is not None else
                           f"(d_in + d_out) x lora_rank {c.lora_rank} entries per matrix (LoRA-matched)"),
                "update_interval": c.update_interval, "reselections": self.updates, "selected": self.summary}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from ftlab.methods._sparse import export_merged

        export_merged(model, out_dir)
        c = self.cfg
        (Path(out_dir) / "lift_selection.json").write_text(json.dumps(
            {"r": c.r, "lora_rank": c.lora_rank, "percent": c.percent, "update_interval": c.update_interval,
             "reselections": self.updates, **self.summary}, indent=1) + "\n")
