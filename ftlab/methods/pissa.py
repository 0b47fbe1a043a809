"""PiSSA (Meng et al., 2024, arXiv:2404.02948): LoRA initialised from the principal singular components.

peft's `init_lora_weights="pissa"` (or "pissa_niter_N", a fast randomized SVD) puts the top-r singular
components of W into A and B and leaves the residual in the base weight. The export converts the trained
adapter so that it applies to the original W (stack notes G5).
"""

from __future__ import annotations

from ftlab.methods.lora import Lora


class Pissa(Lora):
    name = "pissa"
    rewrites_base = True

    def lora_options(self) -> dict:
        n = self.cfg.svd_niter
        return {**super().lora_options(), "init_lora_weights": "pissa" if n is None else f"pissa_niter_{n}"}
