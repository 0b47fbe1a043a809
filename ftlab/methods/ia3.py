"""IA3 (Liu et al., 2022, arXiv:2205.05638): learned rescaling vectors, through peft.

Each target module's output (keys, values) or, for the feedforward modules, its input (down_proj) is multiplied
elementwise by a trained vector that starts at ones, so the model equals the base at step 0. The vectors fold
into the weights on merge-and-unload.
"""

from __future__ import annotations

from pathlib import Path

import peft
from torch import nn

from ftlab.methods.base import Method, MethodContext
from ftlab.methods.lora import check_targets


class Ia3(Method):
    name = "ia3"

    def peft_config(self) -> peft.IA3Config:
        return peft.IA3Config(task_type="CAUSAL_LM", target_modules=list(self.cfg.target_modules),
                              feedforward_modules=list(self.cfg.feedforward_modules))

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        check_targets(model, self.cfg.target_modules)
        return peft.get_peft_model(model, self.peft_config())

    def export(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)
