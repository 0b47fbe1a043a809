"""Full fine-tuning: every parameter of the model trains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ftlab.methods.base import METHODS, Method, MethodConfig, MethodContext

if TYPE_CHECKING:
    from torch import nn


@dataclass
class FullConfig(MethodConfig):
    name: str = "full"
    default_lr: ClassVar[float] = 1e-5  # whole weight matrices: full fine-tuning's (MethodConfig.default_lr)


@METHODS.register("full", config=FullConfig)
class FullFinetune(Method):
    name = "full"

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
