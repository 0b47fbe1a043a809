"""rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732): LoRA with the rank-stabilised scaling alpha/sqrt(r).

A config variant of LoRA: `use_rslora` defaults to true in its schema; everything else is `Lora`.
"""

from __future__ import annotations

from ftlab.methods.lora import Lora


class RsLora(Lora):
    name = "rslora"
