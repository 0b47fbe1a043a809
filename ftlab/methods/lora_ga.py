"""LoRA-GA (Wang et al., 2024, arXiv:2407.05000): LoRA initialised from the gradient, through peft.

`calib_samples` training rows, in batches of `calib_batch_size`, are run forward and backward on the base (no
optimizer step; the loss is the training loss on response tokens); peft's `preprocess_loraga` averages each
target weight's gradient, and the init puts the SVD directions of that gradient into A and B (and subtracts
their product from the base, so the model still equals the base at step 0 up to rounding). The export converts
the adapter to apply to the original W (stack notes G5).
"""

from __future__ import annotations

import peft
from torch import nn

from ftlab.methods.base import MethodContext
from ftlab.methods.lora import Lora


class LoraGa(Lora):
    name = "lora_ga"
    rewrites_base = True

    def lora_options(self) -> dict:
        c = self.cfg
        return {**super().lora_options(), "init_lora_weights": "lora_ga",
                "lora_ga_config": peft.LoraGAConfig(direction=c.direction, scale=c.scale,
                                                    stable_gamma=c.stable_gamma)}

    def preprocess(self, model: nn.Module, config: peft.LoraConfig, ctx: MethodContext) -> None:
        from ftlab.train.batches import IGNORE, _response_loss, collate

        rows = ctx.calibration_rows(self.cfg.calib_samples)
        bs = self.cfg.calib_batch_size
        device = next(model.parameters()).device
        pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id

        def train_step() -> None:
            for i in range(0, len(rows), bs):
                batch = {k: v.to(device) for k, v in collate(rows[i:i + bs], pad).items()}
                if not (batch["labels"][:, 1:] != IGNORE).any():
                    continue
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                _response_loss(out.logits, batch["labels"]).backward()

        peft.preprocess_loraga(model, config, train_step)
