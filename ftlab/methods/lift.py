"""LIFT: Low-rank Informed Sparse Fine-Tuning (Liu et al., 2025, "LIFT the Veil for the Truth: Principal Weights
Emerge after Rank Reduction for Reasoning-Focused Supervised Fine-Tuning", arXiv:2506.00772).

For every target matrix W of the transformer blocks: take its rank-`r` approximation W_r (truncated SVD), rank
the entries by |W_r| and let only the top `percent`% ("Principal Weights") train; everything else, the other
entries, the embeddings, norms and head, stays frozen. The selection is made once, on the pretrained weights
(the reference code can refresh it every `update_interval` steps; ftlab keeps it fixed, as the paper's method
description does). Updates go through ftlab.methods._sparse: one trained vector per matrix, so the optimizer
state holds moments for the selected entries only (result.json `train.method.optimizer_state`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ftlab.config.bounds import at_least
from ftlab.config.registry import ConfigError
from ftlab.methods.base import ALL_LINEAR, METHODS, Method, MethodConfig, MethodContext

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class LiftConfig(MethodConfig):
    """LIFT: only the top `percent`% entries of each matrix's rank-`r` approximation (Principal Weights) train."""

    name: str = "lift"
    r: int = 8  # rank of the approximation the entries are ranked by (the paper: 128 for 7B models)
    percent: float = 5.0  # share of each target matrix's entries that train, in percent
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    svd_niter: Optional[int] = None  # None: exact SVD; k: torch.svd_lowrank with k subspace iterations

    def check(self) -> None:
        super().check()
        at_least("method.r", self.r, 1)
        if not 0 < self.percent <= 100:
            raise ConfigError(f"method.percent: must be in (0, 100] (a percentage of each matrix), "
                              f"got {self.percent!r}")
        at_least("method.svd_niter", self.svd_niter, 1, allow_none=True)
        if not self.target_modules:
            raise ConfigError("method.target_modules: must name at least one module (e.g. q_proj)")


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


def principal_indices(w: torch.Tensor, r: int, percent: float, niter: int | None = None) -> torch.Tensor:
    """Flat indices (sorted) of the top `percent`% entries of |rank-r approximation of w|."""
    import torch

    a = w.detach().float()
    r = min(r, min(a.shape))
    if niter is None:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        approx = (u[:, :r] * s[:r]) @ vh[:r]
    else:
        u, s, v = torch.svd_lowrank(a, q=r, niter=niter)
        approx = (u * s) @ v.T
    k = max(1, round(percent / 100 * a.numel()))
    return torch.topk(approx.abs().reshape(-1), k).indices.sort().values


@METHODS.register("lift", config=LiftConfig)
class Lift(Method):
    name = "lift"

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        from ftlab.methods._sparse import attach, selection_summary

        c = self.cfg
        selection = {n: principal_indices(m.weight, c.r, c.percent, c.svd_niter)
                     for n, m in target_linears(model, c.target_modules).items()}
        attach(model, selection)
        self.summary = selection_summary(model)
        return model

    def report(self) -> dict:
        return {"optimizer_state": "sparse: AdamW moments for the selected entries only (one trained delta vector "
                                   "per matrix); the dense gradient of each matrix is still formed in backward",
                "selected": self.summary}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from ftlab.methods._sparse import export_merged

        export_merged(model, out_dir)
        (Path(out_dir) / "lift_selection.json").write_text(json.dumps(
            {"r": self.cfg.r, "percent": self.cfg.percent, **self.summary}, indent=1) + "\n")
