"""LoRA-GA (Wang et al., 2024, arXiv:2407.05000): LoRA initialised from the gradient, through peft.

`calib_samples` training rows, in batches of `calib_batch_size`, are run forward and backward on the base (no
optimizer step; the loss is the training loss on response tokens); peft's `preprocess_loraga` averages each
target weight's gradient, and the init puts the SVD directions of that gradient into A and B (and subtracts
their product from the base, so the model still equals the base at step 0 up to rounding). The export converts
the adapter to apply to the original W (stack notes G5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftlab.config.bounds import at_least, choice
from ftlab.config.registry import ConfigError
from ftlab.methods.base import METHODS, MethodContext
from ftlab.methods.lora import Lora, LoraConfig

if TYPE_CHECKING:
    import peft
    from torch import nn

LORA_GA_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclass
class LoraGaConfig(LoraConfig):
    """LoRA-GA: the adapter starts from the SVD of the full-weight gradient on calibration batches."""

    name: str = "lora_ga"
    alpha: float = 8.0
    calib_samples: int = 32  # training rows for the gradient estimate
    calib_batch_size: int = 8
    direction: str = "ArB2r"  # peft LoraGAConfig.direction: ArBr | A2rBr | ArB2r | random
    scale: str = "stable"  # peft LoraGAConfig.scale: stable | weight_svd | gd_scale | unit
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
        import peft

        c = self.cfg
        return {**super().lora_options(), "init_lora_weights": "lora_ga",
                "lora_ga_config": peft.LoraGAConfig(direction=c.direction, scale=c.scale,
                                                    stable_gamma=c.stable_gamma)}

    def preprocess(self, model: nn.Module, config: peft.LoraConfig, ctx: MethodContext) -> None:
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

        peft.preprocess_loraga(model, config, train_step)
