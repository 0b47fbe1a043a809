"""CorDA (Yang et al., 2024, arXiv:2406.05223): context-oriented decomposition adaptation, through peft.

Calibration rows (`calib_samples` training rows, one per forward: peft's covariance hook needs batch size 1,
stack notes G7) give each target layer's input covariance C; the SVD of W·C splits W into components. KPM
(knowledge-preserved mode) trains the r components with the *smallest* singular values and freezes the rest;
IPM (instruction-previewed mode) trains the *largest* r. The base keeps the residual, so the export converts the
adapter to apply to the original W (stack notes G5). peft's CorDA module imports `attrs` (G6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftlab.config.bounds import at_least, choice
from ftlab.methods.base import METHODS, MethodContext
from ftlab.methods.lora import Lora, LoraConfig

if TYPE_CHECKING:
    import peft
    from torch import nn

CORDA_MODES = ("kpm", "ipm")


@dataclass
class CordaConfig(LoraConfig):
    """CorDA: SVD of W times the input covariance of calibration rows (from the training data)."""

    name: str = "corda"
    alpha: float = 8.0
    mode: str = "kpm"  # kpm: train the smallest r components (keep knowledge) | ipm: the largest r (task)
    calib_samples: int = 32  # training rows run through the base, one at a time, for the covariance

    def check(self) -> None:
        super().check()
        choice("method.mode", self.mode, CORDA_MODES)
        at_least("method.calib_samples", self.calib_samples, 1)


@METHODS.register("corda", config=CordaConfig)
class Corda(Lora):
    name = "corda"
    rewrites_base = True

    def lora_options(self) -> dict:
        from peft.tuners.lora.config import CordaConfig

        return {**super().lora_options(), "init_lora_weights": "corda",
                "corda_config": CordaConfig(corda_method=self.cfg.mode)}

    def preprocess(self, model: nn.Module, config: peft.LoraConfig, ctx: MethodContext) -> None:
        import torch
        from peft.tuners.lora.corda import preprocess_corda

        from ftlab.models.structure import eval_mode, model_device

        rows = ctx.calibration_rows(self.cfg.calib_samples)
        device = model_device(model)

        def run_model() -> None:
            for r in rows:  # batch size 1 (G7)
                model(input_ids=torch.tensor([r["input_ids"]], device=device))

        with eval_mode(model):
            preprocess_corda(model, config, run_model=run_model)
