"""The method protocol: a few hooks around the one training loop, with do-nothing defaults."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class MethodContext:
    """What a method may need to prepare the model: calibration data, the tokenizer, the seed."""

    tokenizer: Any
    train_rows: list[dict]
    seed: int
    collate: Callable[[list[dict]], dict] | None = None
    extras: dict = field(default_factory=dict)
    max_length: int = 256  # model.max_length: calibration rows are cut like training rows

    def calibration_rows(self, n: int) -> list[dict]:
        """`n` training rows (a seeded sample, without repeats while rows last), encoded like training
        examples: {"input_ids", "labels"} with the prompt masked in labels."""
        from ftlab.train.batches import encode_example

        if not self.train_rows:
            raise ValueError("method: calibration needs training rows, and the training data is empty")
        g = torch.Generator().manual_seed(self.seed * 7919 + 17)
        order = torch.randperm(len(self.train_rows), generator=g).tolist()
        picks = [order[i % len(order)] for i in range(n)]
        return [encode_example(self.tokenizer, self.train_rows[i]["prompt"], self.train_rows[i]["response"],
                               self.max_length) for i in picks]


class Method:
    """Default hooks: train everything, no extra loss, nothing at step end, save the whole model."""

    name = "base"

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Wrap or freeze; return the module the loop trains."""
        return model

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}]

    def build_optimizer(self, groups: list[dict], *, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
        """The optimizer over `param_groups` (each group's lr already set). AdamW; OwLore swaps in GaLore's."""
        return torch.optim.AdamW(groups, lr=lr, betas=betas)

    def report(self) -> dict:
        """What the method wants on record (result.json `train.method`): choices made at run time, e.g. whether
        OwLore found GaLore, how LIFT keeps its optimizer state. JSON-able values only."""
        return {}

    def extra_loss(self, model: nn.Module, batch: dict, outputs: Any, step: int) -> torch.Tensor | None:
        """A term added to the training loss (regularisers)."""
        return None

    def on_step_end(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """After each optimizer step (re-sampling active layers, projecting updates)."""

    def on_stage_start(self, model: nn.Module, stage: int) -> None:
        """Before training stage `stage` (0, 1, ...) of a continual run (data=[a,b,c]); stage 0 comes right
        after `prepare`. HFT re-draws its frozen half here."""

    def state_dict(self) -> dict:
        """What the method changes while training beyond the weights (e.g. LISA's sampler and active blocks),
        saved in every training-state checkpoint. Tensors, numbers, strings, lists and dicts only: it is
        read back with torch.load(weights_only=True)."""
        return {}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        """Restore `state_dict()` on resume, after `prepare` (on a freshly prepared model)."""

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Save what the method trained so that it reloads onto the original base."""
        model.save_pretrained(out_dir, safe_serialization=True)


_REGISTRY: dict[str, str] = {
    "full": "ftlab.methods.full:FullFinetune",
    "lora": "ftlab.methods.lora:Lora",
    "rslora": "ftlab.methods.rslora:RsLora",
    "dora": "ftlab.methods.dora:Dora",
    "pissa": "ftlab.methods.pissa:Pissa",
    "olora": "ftlab.methods.olora:Olora",
    "corda": "ftlab.methods.corda:Corda",
    "lora_ga": "ftlab.methods.lora_ga:LoraGa",
    "ia3": "ftlab.methods.ia3:Ia3",
    "prompt_tuning": "ftlab.methods.prompt_tuning:PromptTuning",
    "freeze": "ftlab.methods.freeze:Freeze",
    "hft": "ftlab.methods.hft:Hft",
    "lisa": "ftlab.methods.lisa:Lisa",
    "owlore": "ftlab.methods.owlore:OwLore",
    "lift": "ftlab.methods.lift:Lift",
    "s2ft": "ftlab.methods.s2ft:S2ft",
    "ssf": "ftlab.methods.ssf:Ssf",
}


def register(name: str, target: str) -> None:
    """Register a method class by import path 'module:Class' (imported only when used)."""
    _REGISTRY[name] = target


def build_method(cfg: Any) -> Method:
    if cfg.name not in _REGISTRY:
        raise KeyError(f"method.name: unknown method {cfg.name!r}; valid: {', '.join(sorted(_REGISTRY))}")
    module, cls = _REGISTRY[cfg.name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
