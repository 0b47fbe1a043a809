"""LISA: Layerwise Importance Sampled AdamW (Pan et al., 2024, arXiv:2403.17919).

The embeddings and the head (with the final norm) always train; of the transformer blocks only `gamma`,
sampled uniformly without replacement, train at a time, and the sample is re-drawn every `interval` steps
(K). On each re-draw the de-activated blocks stop requiring gradients and their AdamW state (exp_avg,
exp_avg_sq, step) is released; a re-activated block starts with fresh state. The optimizer is built once over
every parameter that may train (AdamW skips parameters without a gradient). The sampling is seeded by the run
seed; `history` records (step, active blocks) of every draw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ftlab.config.bounds import at_least
from ftlab.methods.base import METHODS, Method, MethodConfig, MethodContext

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class LisaConfig(MethodConfig):
    """LISA: embeddings and head always train; `gamma` blocks, sampled every `interval` steps, train too."""

    default_lr: ClassVar[float] = 1e-5  # whole weight matrices: full fine-tuning's (MethodConfig.default_lr)

    name: str = "lisa"
    gamma: int = 1  # active blocks at a time
    interval: int = 20  # steps between re-samplings (K)
    fixed_trainable_set: ClassVar[bool] = False

    def check(self) -> None:
        super().check()
        at_least("method.gamma", self.gamma, 1)
        at_least("method.interval", self.interval, 1)


@METHODS.register("lisa", config=LisaConfig)
class Lisa(Method):
    name = "lisa"

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        from ftlab.models.structure import embedding_names, head_names, layer_param_names

        self.layers = layer_param_names(model)
        self.always = embedding_names(model) | head_names(model)
        self.rng = random.Random(f"{self.name}:{ctx.seed}")
        self.history: list[tuple[int, list[int]]] = []
        for n, p in model.named_parameters():
            p.requires_grad_(n in self.always)
        self._resample(model, None, 0)
        return model

    @property
    def active(self) -> list[int]:
        return self.history[-1][1]

    def draw(self) -> list[int]:
        """The next active blocks: `gamma` of them, uniformly without replacement (OwLore re-weights this)."""
        n_layers = len(self.layers)
        return sorted(self.rng.sample(range(n_layers), min(self.cfg.gamma, n_layers)))

    def _resample(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> None:
        active = self.draw()
        params = dict(model.named_parameters())
        for i, names in enumerate(self.layers):
            on = i in active
            for n in names:
                p = params[n]
                if n in self.always:  # a tied parameter shared with the embeddings keeps training
                    continue
                p.requires_grad_(on)
                if not on:
                    p.grad = None
                    if optimizer is not None:
                        optimizer.state.pop(p, None)  # release exp_avg / exp_avg_sq of inactive blocks
        self.history.append((step, active))

    def state_dict(self) -> dict:
        _version, key, gauss = self.rng.getstate()
        return {"rng": list(key), "rng_gauss": [gauss is not None, float(gauss or 0.0)],
                "history": [[step, list(active)] for step, active in self.history]}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        """Continue the sampler and re-apply the active blocks' requires_grad (the optimizer is restored
        separately, with the state of the active blocks only)."""
        has_gauss, gauss = state["rng_gauss"]
        self.rng.setstate((3, tuple(int(x) for x in state["rng"]), float(gauss) if has_gauss else None))
        self.history = [(int(step), [int(i) for i in active]) for step, active in state["history"]]
        params = dict(model.named_parameters())
        for i, names in enumerate(self.layers):
            for n in names:
                if n not in self.always:
                    params[n].requires_grad_(i in self.active)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        candidates = self.always | {n for names in self.layers for n in names}
        params = [p for n, p in model.named_parameters() if n in candidates]
        return [{"params": params, "weight_decay": weight_decay}]

    def on_step_end(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if step % self.cfg.interval == 0:
            self._resample(model, optimizer, step)
