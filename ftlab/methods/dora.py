"""DoRA (Liu et al., 2024, arXiv:2402.09353): weight-decomposed LoRA through peft's `use_dora`.

Each target weight is split into a magnitude (one trained scalar per output feature) and a direction that
LoRA updates; the magnitude starts at the base weight's column norms, so the model equals the base at step 0.
"""

from __future__ import annotations

from ftlab.methods.lora import Lora


class Dora(Lora):
    name = "dora"

    def lora_options(self) -> dict:
        return {**super().lora_options(), "use_dora": True}
