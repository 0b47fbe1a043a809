"""HFT: Half Fine-Tuning (Hui et al., 2024, arXiv:2404.18466).

In each training stage half of the parameters are chosen to learn the new task and the other half stay frozen
to keep earlier knowledge; the choice is made per block and per category ("category-level" in the paper's
Llama figure). Here, in every transformer block: half of the attention matrices (q/k/v/o: 2 of 4), half of the
FFN matrices (gate/up/down) and half of the norms train. Odd counts alternate between rounding up and down
from block to block (FFN: 2, 1, 2, 1, ...), so every pair of blocks trains exactly half of each category.
Which ones is a seeded draw from (run seed, `stage`): a new stage re-draws. Embeddings and the head/final norm
are frozen unless `train_embeddings` / `train_head`. The export (the whole model) also writes
hft_selection.json.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from torch import nn

from ftlab.methods.base import Method, MethodContext
from ftlab.methods.layers import decoder_layers, embedding_names, head_names, set_trainable


def category(child_name: str) -> str:
    n = child_name.lower()
    if "norm" in n:  # before attn: post_attention_layernorm is a norm
        return "norm"
    if "attn" in n or "attention" in n:
        return "attn"
    if "mlp" in n or "feed_forward" in n or "ffn" in n:
        return "mlp"
    return "other"


def block_units(layer: nn.Module) -> dict[str, list[str]]:
    """The block's selectable units by category: each module that owns parameters directly (a linear with its
    bias, a norm), named relative to the block."""
    units: dict[str, list[str]] = {}
    for name, m in layer.named_modules():
        if name and any(True for _ in m.parameters(recurse=False)):
            units.setdefault(category(name.split(".")[0]), []).append(name)
    return units


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


class Hft(Method):
    name = "hft"

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        prefix, layers = decoder_layers(model)
        rng = random.Random(f"hft:{ctx.seed}:{self.cfg.stage}")
        ratio = self.cfg.ratio
        self.selection: dict[int, dict[str, list[str]]] = {}
        names: set[str] = set()
        for i, layer in enumerate(layers):
            chosen = {}
            for cat, units in sorted(block_units(layer).items()):
                n = len(units)
                k = _round_half_up(ratio * n * (i + 1)) - _round_half_up(ratio * n * i)
                chosen[cat] = sorted(rng.sample(units, k))
                for u in chosen[cat]:
                    names |= {f"{prefix}.{i}.{u}.{p}" for p, _ in layer.get_submodule(u).named_parameters(recurse=False)}
            self.selection[i] = chosen
        if self.cfg.train_embeddings:
            names |= embedding_names(model)
        if self.cfg.train_head:
            names |= head_names(model)
        set_trainable(model, names)
        return model

    def export(self, model: nn.Module, out_dir: Path) -> None:
        super().export(model, out_dir)
        sel = {"stage": self.cfg.stage, "ratio": self.cfg.ratio, "blocks": {str(i): s for i, s in self.selection.items()}}
        (Path(out_dir) / "hft_selection.json").write_text(json.dumps(sel, indent=1) + "\n")
