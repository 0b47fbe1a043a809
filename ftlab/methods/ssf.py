"""SSF: Scaling & Shifting your Features (Lian et al., 2022, "Scaling & Shifting Your Features: A New Baseline
for Efficient Model Tuning", NeurIPS 2022, arXiv:2210.08823).

Every target linear y = W x + b gets a trained per-output-feature scale γ and shift β: y' = γ ⊙ y + β; the
model is frozen. γ starts at 1 and β at 0, so the model equals the base at step 0 (the paper's code draws them
near 1 and 0, N(1, 0.02) / N(0, 0.02); exact identity keeps regularisers at 0 at the first step). The export
re-parameterises, as the paper does for inference: W' = diag(γ) W and b' = γ ⊙ b + β, saved as a plain model
whose config asks for the biases (Llama: `attention_bias`, `mlp_bias`; biases of non-target linears in those
groups are zeros). An architecture that cannot hold a bias on a target (e.g. Qwen2's o_proj and MLP) is refused
in `prepare`, before training, naming the modules to drop from `method.target_modules`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ftlab.config.registry import ConfigError
from ftlab.methods.base import ALL_LINEAR, METHODS, Method, MethodConfig, MethodContext
from ftlab.methods.lift import target_linears

if TYPE_CHECKING:
    import torch
    from torch import nn

BIAS_SWITCHES = ("attention_bias", "mlp_bias")  # config flags that give linears a bias (Llama, Mistral-likes)


@dataclass
class SsfConfig(MethodConfig):
    """SSF: a trained scale and shift on each target linear's output features, folded into W and b on export."""

    name: str = "ssf"
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))

    def check(self) -> None:
        super().check()
        if not self.target_modules:
            raise ConfigError("method.target_modules: must name at least one module (e.g. q_proj)")


def _ssf_hook(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    return out * module.ssf_scale.to(out.dtype) + module.ssf_shift.to(out.dtype)


def folded_config(model: nn.Module):
    """A copy of the model's config with every bias switch it has turned on."""
    cfg = copy.deepcopy(model.config)
    for k in BIAS_SWITCHES:
        if hasattr(cfg, k):
            setattr(cfg, k, True)
    return cfg


@METHODS.register("ssf", config=SsfConfig)
class Ssf(Method):
    name = "ssf"

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        import torch
        from torch import nn

        self.targets = sorted(target_linears(model, self.cfg.target_modules))
        self._check_foldable(model)
        self.switches = [k for k in BIAS_SWITCHES if hasattr(model.config, k)]
        for p in model.parameters():
            p.requires_grad_(False)
        for name in self.targets:
            lin = model.get_submodule(name)
            w = lin.weight
            lin.register_parameter("ssf_scale", nn.Parameter(torch.ones(w.shape[0], dtype=w.dtype, device=w.device)))
            lin.register_parameter("ssf_shift", nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)))
            lin.register_forward_hook(_ssf_hook)
        return model

    def _check_foldable(self, model: nn.Module) -> None:
        """The folded model needs a bias on every target: build the folded architecture (meta device, no memory)
        and refuse the targets it has no bias for."""
        import torch

        with torch.device("meta"):
            skeleton = type(model)(folded_config(model))
        missing = [n for n in self.targets if getattr(skeleton.get_submodule(n), "bias", None) is None]
        if missing:
            mods = sorted({n.rsplit(".", 1)[-1] for n in missing})
            keep = ",".join(sorted(set(self.cfg.target_modules) - set(mods))) or "q_proj"
            raise ValueError(f"method=ssf: {type(model).__name__} has no bias on {mods} and no config switch for one, "
                             "so their shift cannot be folded into a plain model; drop them from "
                             f"method.target_modules (e.g. method.target_modules=[{keep}])")

    def folded_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        import torch

        sd = {k: v for k, v in model.state_dict().items() if not k.endswith((".ssf_scale", ".ssf_shift"))}
        with torch.no_grad():
            for name in self.targets:
                lin = model.get_submodule(name)
                g, b = lin.ssf_scale.float(), lin.ssf_shift.float()
                w = lin.weight.float()
                bias = lin.bias.float() if lin.bias is not None else torch.zeros_like(g)
                sd[f"{name}.weight"] = (g[:, None] * w).to(lin.weight.dtype)
                sd[f"{name}.bias"] = (g * bias + b).to(lin.weight.dtype)
        return sd

    def export(self, model: nn.Module, out_dir: Path) -> None:
        import torch
        from torch import nn

        sd = self.folded_state_dict(model)
        cfg = folded_config(model)
        with torch.device("meta"):
            skeleton = type(model)(cfg)
        for name, m in skeleton.named_modules():  # linears the switches gave a bias that SSF did not train
            if isinstance(m, nn.Linear) and m.bias is not None and f"{name}.bias" not in sd:
                w = sd[f"{name}.weight"]
                sd[f"{name}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        model.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
        cfg = folded_config(model)  # after save_pretrained filled in `architectures`
        cfg.save_pretrained(out_dir)

    def report(self) -> dict:
        return {"targets": len(self.targets), "export_sets": {k: True for k in self.switches}}
