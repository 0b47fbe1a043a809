"""OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection (Li et al., 2024, arXiv:2405.18380).

LISA (ftlab.methods.lisa) with two changes:

- Sampling: block l is drawn with probability proportional to its outlier ratio D_l, the fraction of its
  weight entries with |W_ij| > M * mean|W| (mean over the entry's own matrix; counts pooled over the block's
  matrices). Heavy-tailed ("better trained") blocks are drawn more often. The paper, following OWL, scores
  |W_ij| * ||X_j|| with calibration activations; ftlab scores the weights alone (no calibration pass). When
  every ratio is 0 (M too high for the model) the draw is uniform, and `train.method.sampling` says so.
  Blocks with ratio 0 are drawn only when fewer than `gamma` blocks have a positive ratio.
- Low-rank gradient projection: the 2-D weights of the blocks train with GaLore's AdamW (`galore_torch`,
  projected moments of rank `galore_rank`, projection refreshed every `galore_update_proj_gap` steps) when
  that package is importable; otherwise plain AdamW, said on stderr and in result.json
  (`train.method.galore: false` with the reason). Embeddings, head and norms always use plain Adam moments.

As in LISA, the optimizer state of de-activated blocks is released (a re-activated block starts afresh,
GaLore projection included).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftlab.config.bounds import at_least
from ftlab.config.registry import ConfigError
from ftlab.methods.base import METHODS, MethodContext
from ftlab.methods.lisa import Lisa, LisaConfig

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class OwLoreConfig(LisaConfig):
    """OwLore: LISA sampling weighted by each block's outlier ratio; GaLore low-rank moments when installed."""

    name: str = "owlore"
    outlier_m: float = 3.0  # an entry is an outlier when |W_ij| > outlier_m * mean|W| of its matrix
    galore: bool = True  # GaLore projection for the sampled blocks' matrices when galore_torch imports
    galore_rank: int = 16
    galore_update_proj_gap: int = 100  # steps between refreshes of the projection (SVD of the gradient)
    galore_scale: float = 1.0

    def check(self) -> None:
        super().check()
        if not self.outlier_m > 0:
            raise ConfigError(f"method.outlier_m: must be > 0, got {self.outlier_m!r}")
        at_least("method.galore_rank", self.galore_rank, 1)
        at_least("method.galore_update_proj_gap", self.galore_update_proj_gap, 1)
        if not self.galore_scale > 0:
            raise ConfigError(f"method.galore_scale: must be > 0, got {self.galore_scale!r}")


def outlier_ratio(layer: nn.Module, m: float) -> float:
    """Fraction of the entries of `layer`'s 2-D weights with |W_ij| > m * mean|W| (mean per matrix)."""
    import torch

    hits, total = 0, 0
    with torch.no_grad():
        for _, p in layer.named_parameters():
            if p.dim() != 2:
                continue
            a = p.detach().float().abs()
            hits += int((a > m * a.mean()).sum())
            total += a.numel()
    return hits / total if total else 0.0


def galore_unavailable() -> str | None:
    """None when `galore_torch` imports; otherwise why not."""
    try:
        import galore_torch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or its own imports failing (bitsandbytes)
        return f"galore_torch is not importable ({type(e).__name__}: {e})"
    return None


@METHODS.register("owlore", config=OwLoreConfig)
class OwLore(Lisa):
    name = "owlore"

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        from ftlab.models.structure import decoder_layers

        _, blocks = decoder_layers(model)
        self.ratios = [outlier_ratio(b, self.cfg.outlier_m) for b in blocks]
        total = sum(self.ratios)
        self.uniform = total == 0
        self.probs = [1 / len(blocks)] * len(blocks) if self.uniform else [r / total for r in self.ratios]
        self.galore_why_not = galore_unavailable() if self.cfg.galore else "method.galore=false"
        self.use_galore = self.galore_why_not is None
        if self.cfg.galore and not self.use_galore:
            print(f"ftlab: owlore: {self.galore_why_not}; the sampled blocks train with plain AdamW (full-rank "
                  "moments), not GaLore's low-rank projection. pip install galore-torch to get it.", file=sys.stderr)
        model = super().prepare(model, ctx)
        self._by_name = dict(model.named_parameters())
        return model

    def draw(self) -> list[int]:
        """`gamma` blocks without replacement, each draw proportional to the outlier ratio of those left."""
        left = list(range(len(self.layers)))
        chosen: list[int] = []
        for _ in range(min(self.cfg.gamma, len(left))):
            weights = [self.probs[i] for i in left]
            total = sum(weights)
            if total <= 0:  # only zero-ratio blocks left: uniform among them
                pick = left[self.rng.randrange(len(left))]
            else:
                x, acc, pick = self.rng.random() * total, 0.0, left[-1]
                for i, w in zip(left, weights):
                    acc += w
                    if x < acc:
                        pick = i
                        break
            chosen.append(pick)
            left.remove(pick)
        return sorted(chosen)

    def build_optimizer(self, groups: list[dict], *, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
        if not self.use_galore:
            return super().build_optimizer(groups, lr=lr, betas=betas)
        block_ids = {id(p) for names in self.layers for p in self._params(names)}
        c = self.cfg
        out = []
        for g in groups:  # split each group: the blocks' matrices get GaLore's projection
            low = [p for p in g["params"] if id(p) in block_ids and p.dim() == 2]
            rest = [p for p in g["params"] if not (id(p) in block_ids and p.dim() == 2)]
            extra = {k: v for k, v in g.items() if k != "params"}
            if rest:
                out.append({**extra, "params": rest})
            if low:
                out.append({**extra, "params": low, "rank": c.galore_rank, "update_proj_gap": c.galore_update_proj_gap,
                            "scale": c.galore_scale, "proj_type": "std"})
        return checkpointable_galore_adamw()(out, lr=lr, betas=betas, eps=1e-8, no_deprecation_warning=True)

    def _params(self, names: list[str]) -> list[nn.Parameter]:
        return [self._by_name[n] for n in names]

    def report(self) -> dict:
        return {"sampling": "uniform (every outlier ratio is 0 at this outlier_m)" if self.uniform
                else "proportional to the outlier ratio",
                "outlier_m": self.cfg.outlier_m, "outlier_ratio": self.ratios, "sampling_prob": self.probs,
                "galore": self.use_galore,
                "galore_note": (f"GaLore AdamW, rank {self.cfg.galore_rank}, projection refreshed every "
                                f"{self.cfg.galore_update_proj_gap} steps" if self.use_galore else
                                f"plain AdamW: {self.galore_why_not}")}


_GALORE_CLS = None


def checkpointable_galore_adamw():
    """galore_torch's AdamW whose state_dict holds tensors only: its per-parameter GaLoreProjector (a Python
    object) is saved as the projection matrix and rebuilt on load, so ftlab's training-state checkpoints (read
    with weights_only=True) resume it exactly."""
    global _GALORE_CLS
    if _GALORE_CLS is not None:
        return _GALORE_CLS
    from galore_torch import GaLoreAdamW
    from galore_torch.galore_projector import GaLoreProjector

    class CheckpointableGaLoreAdamW(GaLoreAdamW):
        def state_dict(self):
            sd = super().state_dict()
            state = {}
            for k, v in sd["state"].items():
                if "projector" in v:
                    v = {kk: vv for kk, vv in v.items() if kk != "projector"}
                    v["galore_ortho"] = self.state_projector_matrix(k)
                state[k] = v
            return {**sd, "state": state}

        def state_projector_matrix(self, index: int) -> torch.Tensor:
            p = [p for g in self.param_groups for p in g["params"]][index]
            return self.state[p]["projector"].ortho_matrix

        def load_state_dict(self, state_dict):
            orthos = {k: v["galore_ortho"] for k, v in state_dict["state"].items() if "galore_ortho" in v}
            stripped = {k: {kk: vv for kk, vv in v.items() if kk != "galore_ortho"}
                        for k, v in state_dict["state"].items()}
            super().load_state_dict({**state_dict, "state": stripped})
            index = 0
            for g in self.param_groups:
                for p in g["params"]:
                    if index in orthos:
                        proj = GaLoreProjector(g["rank"], update_proj_gap=g["update_proj_gap"], scale=g["scale"],
                                               proj_type=g["proj_type"])
                        proj.ortho_matrix = orthos[index].to(p.device)
                        self.state[p]["projector"] = proj
                    index += 1

    _GALORE_CLS = CheckpointableGaLoreAdamW
    return _GALORE_CLS
