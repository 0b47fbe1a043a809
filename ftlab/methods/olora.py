"""OLoRA (Büyükakyüz, 2024, arXiv:2406.01775): LoRA initialised from an orthonormal QR decomposition of W.

peft's `init_lora_weights="olora"`; the base keeps the residual, and the export converts the adapter so that it
applies to the original W (stack notes G5).
"""

from __future__ import annotations

from ftlab.methods.lora import Lora


class Olora(Lora):
    name = "olora"
    rewrites_base = True

    def lora_options(self) -> dict:
        return {**super().lora_options(), "init_lora_weights": "olora"}
