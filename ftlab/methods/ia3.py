"""IA3 (Liu et al., 2022, arXiv:2205.05638): learned rescaling vectors, through peft.

Each target module's output (keys, values) or, for the feedforward modules, its input (down_proj) is multiplied
elementwise by a trained vector that starts at ones, so the model equals the base at step 0. The vectors fold
into the weights on merge-and-unload.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ftlab.config.registry import ConfigError
from ftlab.methods.base import METHODS, Method, MethodConfig, MethodContext
from ftlab.methods.lora import check_targets

if TYPE_CHECKING:
    import peft
    from torch import nn


@dataclass
class Ia3Config(MethodConfig):
    """IA3: learned per-feature scaling vectors on keys, values and the FFN input of down_proj."""

    name: str = "ia3"
    target_modules: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    # the subset of target_modules whose *input* is scaled (FFN); the others scale their output
    feedforward_modules: list[str] = field(default_factory=lambda: ["down_proj"])

    def check(self) -> None:
        super().check()
        if not self.target_modules:
            raise ConfigError("method.target_modules: must name at least one module (e.g. v_proj)")
        extra = [m for m in self.feedforward_modules if m not in self.target_modules]
        if extra:
            raise ConfigError(f"method.feedforward_modules: {extra} are not in method.target_modules "
                              f"{self.target_modules}; feedforward modules must be targets too")


@METHODS.register("ia3", config=Ia3Config)
class Ia3(Method):
    name = "ia3"

    def peft_config(self) -> peft.IA3Config:
        import peft

        return peft.IA3Config(task_type="CAUSAL_LM", target_modules=list(self.cfg.target_modules),
                              feedforward_modules=list(self.cfg.feedforward_modules))

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        import peft

        check_targets(model, self.cfg.target_modules)
        return peft.get_peft_model(model, self.peft_config())

    def export(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)
