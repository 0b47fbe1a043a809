"""The method protocol: a few hooks around the one training loop, with do-nothing defaults; the method registry.

A method is one module of this package: its config (a `MethodConfig` subclass with its range checks), its
`Method` subclass, and `@METHODS.register(name, config=...)` on that class; plus one YAML in conf/method/ and one
row in tests/test_methods.py. The registry discovers every public module of this package when a method name is
first asked for, so every module here imports torch, peft and transformers only inside the functions that use
them (`if TYPE_CHECKING:` for annotations); classes that must subclass nn.Module at module level live in private
modules (`_sparse.py`, `_prompt.py`), which discovery skips.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ftlab.config.method import METHODS, MethodConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["ALL_LINEAR", "METHODS", "Method", "MethodConfig", "MethodContext", "build_method", "count_params"]

# Every linear of a Llama-style block: the default targets of the LoRA family, LIFT and SSF.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class MethodContext:
    """What a method may need to prepare the model: calibration data, the tokenizer, the seed."""

    tokenizer: Any
    train_rows: list[dict]
    seed: int
    max_length: int = 256  # model.max_length: calibration rows are cut like training rows
    data: Any = None  # the run's DataConfig (stage 0's): where general rows come from (CorDA's kpm calibration)

    def calibration_rows(self, n: int) -> list[dict]:
        """`n` training rows (a seeded sample, without repeats while rows last), encoded like training
        examples: {"input_ids", "labels"} with the prompt masked in labels."""
        import torch

        from ftlab.train.batches import encode_example

        if not self.train_rows:
            raise ValueError("method: calibration needs training rows, and the training data is empty")
        g = torch.Generator().manual_seed(self.seed * 7919 + 17)
        order = torch.randperm(len(self.train_rows), generator=g).tolist()
        picks = [order[i % len(order)] for i in range(n)]
        return [encode_example(self.tokenizer, self.train_rows[i]["prompt"], self.train_rows[i]["response"],
                               self.max_length) for i in picks]


class Method:
    """Default hooks: train everything, nothing at step end, save the whole model."""

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
        import torch

        return torch.optim.AdamW(groups, lr=lr, betas=betas)

    def report(self) -> dict:
        """What the method wants on record (result.json `train.method`): choices made at run time, e.g. whether
        OwLore found GaLore, how LIFT keeps its optimizer state. JSON-able values only."""
        return {}

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

    def use_kernels(self, model: nn.Module, device: Any) -> Optional[dict]:
        """hw.kernels=true, after `prepare`: route the method's layers through ftlab.kernels where the device runs
        them; what was done (result.json `kernels`), or None when the method has no kernel (the default)."""
        return None

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Save what the method trained so that it reloads onto the original base."""
        model.save_pretrained(out_dir, safe_serialization=True)


def build_method(cfg: Any) -> Method:
    """The registered Method for `cfg.name` (a validated method config), built on that config."""
    return METHODS.get(cfg.name)(cfg)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
