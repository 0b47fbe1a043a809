"""LoRA (Hu et al., 2021, arXiv:2106.09685) through peft; rsLoRA (Kalajdzievski, 2023) with use_rslora.

The base weights are frozen; each target linear gets B @ A of rank r, scaled by alpha/r (alpha/sqrt(r) with
rsLoRA). B starts at zero, so the tuned model equals the base at step 0.
"""

from __future__ import annotations

from pathlib import Path

import peft
from torch import nn

from ftlab.methods.base import Method, MethodContext


class Lora(Method):
    name = "lora"

    def peft_config(self) -> peft.LoraConfig:
        c = self.cfg
        return peft.LoraConfig(task_type="CAUSAL_LM", r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout,
                               target_modules=list(c.target_modules), use_rslora=c.use_rslora)

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [m for m in self.cfg.target_modules if m not in present]
        if missing:
            raise ValueError(f"method.target_modules: {missing} not found in the model; "
                             f"linear modules it has: {sorted(n for n in present if n.endswith('proj'))}")
        return peft.get_peft_model(model, self.peft_config())

    def export(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)  # adapter_config.json + adapter_model.safetensors
