"""Layer freezing with optional layer-wise LR decay.

Telly (Shi et al., 2023, "Towards Efficient Fine-tuning of Pre-trained Code Models") finds that the top layers
change most and fine-tunes by freezing the rest; "Fine-Tuning Large Neural Language Models for Biomedical NLP"
(Tinn et al., 2023) compares freezing lower layers with layer-wise LR decay. Here: the top `train_top` blocks
train (or every block above the bottom `freeze_bottom`), plus the head and final norm (`train_head`) and,
optionally, the input embeddings. With `llrd` < 1 the trained block i places from the top gets lr * llrd**i and the
input embeddings, the layer below the bottom block, lr * llrd**n_blocks (the most decayed rate, as layer-wise decay
defines it); the head and final norm train at lr.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

from ftlab.config.bounds import at_least
from ftlab.config.registry import ConfigError
from ftlab.methods.base import METHODS, Method, MethodConfig, MethodContext

if TYPE_CHECKING:
    from torch import nn


@dataclass
class FreezeConfig(MethodConfig):
    """Layer freezing: the top `train_top` blocks train (or all but the bottom `freeze_bottom`)."""

    default_lr: ClassVar[float] = 1e-5  # whole weight matrices: full fine-tuning's (MethodConfig.default_lr)

    name: str = "freeze"
    train_top: Optional[int] = 1  # exactly one of train_top / freeze_bottom is set
    freeze_bottom: Optional[int] = None
    train_embeddings: bool = False  # input embeddings (shared with the head when the model ties them)
    train_head: bool = True  # lm head and final norm
    llrd: float = 1.0  # layer-wise LR decay: block i from the top trains at lr * llrd**i (1.0: off)

    def check(self) -> None:
        super().check()
        if (self.train_top is None) == (self.freeze_bottom is None):
            raise ConfigError("method.train_top: set exactly one of method.train_top (blocks that train, from the "
                              "top) and method.freeze_bottom (blocks frozen, from the bottom); the other =null, got "
                              f"train_top={self.train_top!r}, freeze_bottom={self.freeze_bottom!r}")
        at_least("method.train_top", self.train_top, 0, allow_none=True)
        at_least("method.freeze_bottom", self.freeze_bottom, 0, allow_none=True)
        if not 0 < self.llrd <= 1:
            raise ConfigError(f"method.llrd: must be in (0, 1], got {self.llrd!r}")


@METHODS.register("freeze", config=FreezeConfig)
class Freeze(Method):
    name = "freeze"

    def trainable_layers(self, n_layers: int) -> list[int]:
        c = self.cfg
        k = c.train_top if c.train_top is not None else n_layers - c.freeze_bottom
        k = max(0, min(n_layers, k))
        return list(range(n_layers - k, n_layers))

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        from ftlab.models.structure import embedding_names, head_names, layer_param_names, set_trainable

        layers = layer_param_names(model)
        self.layers = self.trainable_layers(len(layers))
        names = {n for i in self.layers for n in layers[i]}
        if self.cfg.train_embeddings:
            names |= embedding_names(model)
        if self.cfg.train_head:
            names |= head_names(model)
        if not names:
            raise ValueError("method freeze: nothing trains; raise method.train_top or set method.train_head=true")
        set_trainable(model, names)
        return model

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        if self.cfg.llrd == 1.0:
            return super().param_groups(model, weight_decay)
        from ftlab.models.structure import embedding_names, layer_param_names

        layers = layer_param_names(model)
        by_name = dict(model.named_parameters())
        groups, seen = [], set()
        for i in self.layers:
            ps = [by_name[n] for n in layers[i] if by_name[n].requires_grad]
            seen |= set(layers[i])
            if ps:  # lr_scale: the loop multiplies train.lr by it
                groups.append({"params": ps, "weight_decay": weight_decay,
                               "lr_scale": self.cfg.llrd ** (len(layers) - 1 - i)})
        # LLRD counts the input embeddings as the layer below block 0 (ULMFiT, ELECTRA, Tinn et al.): the most
        # decayed rate, llrd**n_blocks; the head and final norm sit above the top block and train at the full rate.
        # A head tied to the embeddings is one parameter: the embeddings' rate when train_embeddings, else the head's.
        emb = embedding_names(model) if self.cfg.train_embeddings else set()
        bottom = [p for n, p in by_name.items() if p.requires_grad and n not in seen and n in emb]
        if bottom:
            groups.append({"params": bottom, "weight_decay": weight_decay, "lr_scale": self.cfg.llrd ** len(layers)})
        rest = [p for n, p in by_name.items() if p.requires_grad and n not in seen and n not in emb]
        if rest:
            groups.append({"params": rest, "weight_decay": weight_decay, "lr_scale": 1.0})
        return groups
