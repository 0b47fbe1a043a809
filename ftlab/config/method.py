"""The `method` config group: the schema every method's config extends, and the registry of methods.

Each method declares its config (a `MethodConfig` subclass with its own `check`) and registers itself beside its
code, in ftlab/methods/ (`@METHODS.register("lora", config=LoraConfig)`). The config layer never imports method
code by name: the registry imports the public modules of `ftlab.methods` the first time a method name is asked
for (those modules import torch only inside their functions, so validating a config stays torch-free).
`ftlab.methods.base` re-exports both names for the methods' own use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from omegaconf import MISSING

from ftlab.config.registry import ConfigError, Registry


@dataclass
class MethodConfig:
    """The knobs every method has. A method's config adds its own, with their range checks in `check`."""

    name: str = MISSING
    # The method trains at train.lr * lr_scale: methods that update few parameters or only scale features (IA3,
    # SSF, prompt tuning, LIFT, S2FT) set a scale > 1 in their YAML, so a train.lr sweep moves every method.
    lr_scale: float = 1.0
    # Whether the set of trainable parameters stays fixed while training: DDP's reducer and FSDP's shards are
    # built once, for a fixed set, so a method that re-samples it (LISA, OwLore) runs on one process.
    fixed_trainable_set: ClassVar[bool] = True
    # train.lr when the config leaves it null (on the tiny world times TINY_WORLD_LR_SCALE, ftlab.config.schema; the
    # loop uses AdamW). Parameter-efficient methods 1e-4, whole-weight-matrix methods (full, freeze, hft, lisa,
    # owlore) 1e-5: LoRA's best rate is about 10x full fine-tuning's (Biderman et al. 2024, "LoRA Learns Less and
    # Forgets Less", MetaMathQA on Llama-2-7B: full 1e-5, LoRA 1e-4 at r=16/64, LionW; Schulman et al. 2025,
    # "LoRA Without Regret": the tinker cookbook's get_lora_lr_over_full_finetune_lr is a fixed 10). Absolute
    # AdamW rates in the same range: LoRA 2e-4 (Hu et al. 2021, microsoft/LoRA examples/NLG, GPT-2 M; QLoRA,
    # artidoro/qlora scripts/finetune_guanaco_7b.sh, 1e-4 for 65B), full fine-tuning 2e-5 (GraphPKU/PiSSA
    # scripts/metamath_llama2_7b/run_full_finetune.sh). Where a method's authors train at another rate its
    # config says so (pissa, corda 2e-5; prompt_tuning). A method's lr_scale multiplies it as it does train.lr
    # (ia3: 1e-4 x 30 = 3e-3, T-Few's rate, r-three/t-few configs/ia3.json).
    default_lr: ClassVar[float] = 1e-4

    def check(self) -> None:
        """Range checks of the knobs (types and unknown keys are refused by the schema itself). Raise ConfigError
        naming the full key (`method.r: must be >= 1, got 0`); a subclass calls super().check() first."""
        if not self.lr_scale > 0:
            raise ConfigError(f"method.lr_scale: must be > 0 (the method trains at train.lr * lr_scale), got "
                              f"{self.lr_scale!r}")


# name -> the Method class (ftlab.methods.base.Method), with its MethodConfig subclass as the schema.
METHODS: Registry = Registry("method", "method.name", discover="ftlab.methods")
