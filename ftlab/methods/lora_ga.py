"""LoRA-GA (Wang et al., 2024, arXiv:2407.05000): LoRA initialised from the gradient, as the paper and the official
code (Outsider565/LoRA-GA) define it.

Gradient: `calib_samples` training rows (128), in batches of `calib_batch_size` (2), run forward and backward on the
base with the training loss on response tokens (no optimizer step); each target weight's gradient G is the mean
of the per-batch gradients (peft's `preprocess_loraga`, which averages like the official `estimate_gradient`). The
defaults are the official example's (examples/float_llama2-7b_metamath.py: sample_size=128, LoraGAConfig bsz=2,
iters=sample_size // 2).

Init (the official `lora_ga_init`, peft/src/peft/tuners/lora/layer.py of Outsider565/LoRA-GA, the same in
reproduce/run_exp.py): G ~ U S V^T (torch.svd_lowrank, q = 4r, niter = 4), and for direction ArB2r
A = c * V[:, :r]^T and B = c * U[:, r:2r], with `scale` stable: c = d_out^(1/4) / sqrt(stable_gamma) on BOTH
factors and no singular values; the base keeps W - s * B @ A (s = alpha / r), so the model equals the base at step 0
up to rounding. peft 0.21.2's own `lora_ga` init is not this one (it multiplies B by the singular values and applies
c to B only: peft/tuners/lora/layer.py, `lora_ga_init`), which makes the first step's gradient on A ~50x smaller;
so ftlab lets peft build a plain adapter (`init_lora_weights=True`) and writes the paper's init into it
(`postprocess`). The export converts the adapter to apply to the original W (stack notes G5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ftlab.config.bounds import at_least, choice
from ftlab.config.registry import ConfigError
from ftlab.methods.base import METHODS, MethodContext
from ftlab.methods.lora import Lora, LoraConfig

if TYPE_CHECKING:
    import peft
    import torch
    from torch import nn

LORA_GA_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
# the official names: stable | weightS | gd | unit (ftlab keeps the names it had for the last three)
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclass
class LoraGaConfig(LoraConfig):
    """LoRA-GA: the adapter starts from the SVD of the full-weight gradient on calibration batches."""

    name: str = "lora_ga"
    calib_samples: int = 128  # training rows for the gradient estimate (the official example's sample_size)
    calib_batch_size: int = 2  # the official LoraGAConfig.bsz
    direction: str = "ArB2r"  # which singular directions go to A and B: ArBr | A2rBr | ArB2r | random
    scale: str = "stable"  # stable: c = d_out^(1/4)/sqrt(stable_gamma) on A and B | weight_svd | gd_scale | unit
    stable_gamma: float = 16.0

    def check(self) -> None:
        super().check()
        at_least("method.calib_samples", self.calib_samples, 1)
        at_least("method.calib_batch_size", self.calib_batch_size, 1)
        choice("method.direction", self.direction, LORA_GA_DIRECTIONS)
        choice("method.scale", self.scale, LORA_GA_SCALES)
        if not self.stable_gamma > 0:
            raise ConfigError(f"method.stable_gamma: must be > 0, got {self.stable_gamma!r}")


@METHODS.register("lora_ga", config=LoraGaConfig)
class LoraGa(Lora):
    name = "lora_ga"
    rewrites_base = True

    def lora_options(self) -> dict:
        # a plain adapter (peft's kaiming A, zero B, base untouched); `postprocess` writes the LoRA-GA init into it
        return {**super().lora_options(), "init_lora_weights": True}

    def preprocess(self, model: nn.Module, config: peft.LoraConfig, ctx: MethodContext) -> None:
        """The mean gradient of every target weight, left on the module as `_peft_loraga_grad` (peft's name)."""
        import copy

        import peft

        from ftlab.models.structure import model_device, pad_id
        from ftlab.train.batches import IGNORE, collate, response_loss

        rows = ctx.calibration_rows(self.cfg.calib_samples)
        bs = self.cfg.calib_batch_size
        device, pad = model_device(model), pad_id(ctx.tokenizer)

        def train_step() -> None:
            for i in range(0, len(rows), bs):
                batch = {k: v.to(device) for k, v in collate(rows[i:i + bs], pad).items()}
                if not (batch["labels"][:, 1:] != IGNORE).any():
                    continue
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                response_loss(out.logits, batch["labels"]).backward()

        ga = copy.deepcopy(config)  # preprocess_loraga asks for a lora_ga_config; its fields are not used here
        ga.lora_ga_config = peft.LoraGAConfig()
        peft.preprocess_loraga(model, ga, train_step)

    def postprocess(self, model: peft.PeftModel, ctx: MethodContext) -> None:
        import torch
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import transpose

        c = self.cfg
        g = torch.Generator().manual_seed(ctx.seed * 7919 + 31)  # direction=random
        done = 0
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
                continue
            base = layer.get_base_layer()
            grad = base.__dict__.pop("_peft_loraga_grad", None)
            if grad is None:
                raise RuntimeError(f"method lora_ga: no gradient was estimated for {name}")
            w = transpose(base.weight.data, layer.fan_in_fan_out)  # (out, in)
            a, b = loraga_factors(transpose(grad, layer.fan_in_fan_out), w, layer.r["default"],
                                  layer.scaling["default"], c.direction, c.scale, c.stable_gamma, g, name=name)
            a_w, b_w = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            with torch.no_grad():
                a_w.copy_(a.to(a_w.dtype))
                b_w.copy_(b.to(b_w.dtype))
                # W - s * B @ A in float32, from the factors as the adapter holds them (peft's and the official order)
                offset = layer.scaling["default"] * (b_w.float() @ a_w.float())
                new = (w.float() - offset).to(base.weight.dtype)
                base.weight.data = transpose(new, layer.fan_in_fan_out).contiguous()
            done += 1
        if not done:
            raise RuntimeError("method lora_ga: peft built no LoRA layer to initialise")


def loraga_factors(grad: torch.Tensor, weight: torch.Tensor, r: int, scaling: float, direction: str, scale: str,
                   stable_gamma: float, generator: Optional[torch.Generator] = None,
                   name: str = "a target") -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), float32, of the official LoRA-GA init for one weight: `grad` and `weight` are (d_out, d_in)."""
    import torch

    d_out, d_in = grad.shape
    if 2 * r > min(d_out, d_in):
        raise ValueError(f"method.r: LoRA-GA takes 2r = {2 * r} singular directions of each gradient, but {name} is "
                         f"{d_out} x {d_in}; use method.r <= {min(d_out, d_in) // 2}")
    u, _, v = torch.svd_lowrank(grad.float(), q=min(4 * r, d_out, d_in), niter=4)
    vt = v.T  # rows: right singular vectors, by decreasing singular value
    if direction == "ArBr":
        b, a = u[:, 0:2 * r:2], vt[1:2 * r:2]
    elif direction == "A2rBr":
        b, a = u[:, :r], vt[r:2 * r]
    elif direction == "ArB2r":
        b, a = u[:, r:2 * r], vt[:r]
    elif direction == "random":  # the official: a random split of the first 2r directions between A and B
        perm = torch.randperm(2 * r, generator=generator).to(u.device)
        a, b = vt[perm[:r]], u[:, perm[r:]]
    else:
        raise ValueError(f"method.direction: {direction!r}")
    if scale == "stable":  # the output's scale depends on d_out only
        f = d_out ** 0.25 / stable_gamma ** 0.5
        a, b = a * f, b * f
    elif scale == "gd_scale":  # the official "gd"
        a, b = a / scaling, b / scaling
    elif scale == "weight_svd":  # the official "weightS": the mean sqrt of W's top-r singular values, over s
        s_w = torch.svd_lowrank(weight.float(), q=min(4 * r, d_out, d_in), niter=4)[1] / scaling
        f = s_w[:r].sqrt().mean()
        a, b = a * f, b * f
    elif scale != "unit":  # unit: the orthonormal directions as they are
        raise ValueError(f"method.scale: {scale!r}")
    return a.contiguous(), b.contiguous()
