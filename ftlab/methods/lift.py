"""LIFT: Low-rank Informed Sparse Fine-Tuning (Liu et al., 2025, "LIFT the Veil for the Truth: Principal Weights
Emerge after Rank Reduction for Reasoning-Focused Supervised Fine-Tuning", arXiv:2506.00772).

For every target matrix W of the transformer blocks: take its rank-`r` approximation W_r (truncated SVD), rank
the entries by |W_r| and let only the top `percent`% ("Principal Weights") train; everything else, the other
entries, the embeddings, norms and head, stays frozen. The selection is made once, on the pretrained weights
(the reference code can refresh it every `update_interval` steps; ftlab keeps it fixed, as the paper's method
description does). Updates go through ftlab.methods.sparse: one trained vector per matrix, so the optimizer
state holds moments for the selected entries only (result.json `train.method.optimizer_state`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ftlab.methods.base import Method, MethodContext
from ftlab.methods.sparse import attach, export_merged, selection_summary
from ftlab.models.structure import decoder_layers


def target_linears(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """{qualified name: module} of the linears inside the transformer blocks whose last name part is in `names`."""
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


class Lift(Method):
    name = "lift"

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
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
        export_merged(model, out_dir)
        (Path(out_dir) / "lift_selection.json").write_text(json.dumps(
            {"r": self.cfg.r, "percent": self.cfg.percent, **self.summary}, indent=1) + "\n")
