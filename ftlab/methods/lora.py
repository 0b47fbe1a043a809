"""LoRA (Hu et al., 2021, arXiv:2106.09685) through peft, and the base of the LoRA family.

The base weights are frozen; each target linear gets B @ A of rank r, scaled by alpha/r (alpha/sqrt(r) with
rsLoRA). B starts at zero, so the tuned model equals the base at step 0.

The variants (rslora, dora, pissa, olora, corda, lora_ga) are small subclasses: each says which peft options it
sets (`lora_options`), and, when its init needs the model first, what it runs before `get_peft_model`
(`preprocess`). Inits that rewrite the base weights (`rewrites_base = True`: PiSSA, OLoRA, CorDA, LoRA-GA) keep
their initial adapter and export through peft's weight conversion, so the saved adapter applies to the
ORIGINAL base weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import peft
from torch import nn

from ftlab.methods.base import Method, MethodContext


class Lora(Method):
    name = "lora"
    rewrites_base = False  # True: the init changes the base weights (the residual W - BA stays in the model)

    def __init__(self, cfg):
        super().__init__(cfg)
        self._init_dir: tempfile.TemporaryDirectory | None = None

    def lora_options(self) -> dict:
        """peft.LoraConfig options beyond r/alpha/dropout/targets (a variant's whole definition)."""
        return {"use_rslora": self.cfg.use_rslora}

    def peft_config(self) -> peft.LoraConfig:
        c = self.cfg
        return peft.LoraConfig(task_type="CAUSAL_LM", r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout,
                               target_modules=list(c.target_modules), **self.lora_options())

    def preprocess(self, model: nn.Module, config: peft.LoraConfig, ctx: MethodContext) -> None:
        """Run on the base before get_peft_model (CorDA's covariance, LoRA-GA's gradient estimate)."""

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        check_targets(model, self.cfg.target_modules)
        config = self.peft_config()
        self.preprocess(model, config, ctx)
        model = peft.get_peft_model(model, config)
        if self.rewrites_base:
            self._save_initial(model)
        return model

    def _save_initial(self, model) -> None:
        """Keep the initial adapter as a plain LoRA adapter: export converts against it (stack notes G5)."""
        pc = model.peft_config["default"]
        init = pc.init_lora_weights
        self._init_dir = tempfile.TemporaryDirectory(prefix=f"ftlab_{self.name}_init_")
        pc.init_lora_weights = True
        try:
            model.save_pretrained(self._init_dir.name)
        finally:
            pc.init_lora_weights = init

    def export(self, model: nn.Module, out_dir: Path) -> None:
        # adapter_config.json + adapter_model.safetensors
        if self._init_dir is None:
            model.save_pretrained(out_dir)
            return
        # rank 2r adapter that reproduces (residual + BA) when added to the original W
        model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=self._init_dir.name)


def check_targets(model: nn.Module, targets) -> None:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in targets if m not in present]
    if missing:
        raise ValueError(f"method.target_modules: {missing} not found in the model; "
                         f"linear modules it has: {sorted(n for n in present if n.endswith('proj'))}")
