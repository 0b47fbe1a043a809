"""Full fine-tuning: every parameter of the model trains."""

from __future__ import annotations

from torch import nn

from ftlab.methods.base import Method, MethodContext


class FullFinetune(Method):
    name = "full"

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
