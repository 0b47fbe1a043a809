"""S2FT: Structured Sparse Fine-Tuning (Yang et al., 2024, "S²FT: Efficient, Scalable and Generalizable LLM
Fine-tuning by Structured Sparsity", NeurIPS 2024, arXiv:2412.06289).

In every transformer block a seeded draw picks `heads` attention heads and `channels` FFN (intermediate)
channels; only their slices of the coupled matrices train:
- a head h: its rows of q_proj, the rows of the key-value head serving it (h // (heads per kv head)) in
  k_proj / v_proj, and its columns of o_proj (whichever of these are in `attn_modules`);
- a channel c: its row of gate_proj / up_proj and its column of down_proj (those in `ffn_modules`).
The paper permutes the selected rows/columns into dense submatrices and back-propagates only through them (its
memory and speed win); this is the masked version (ftlab.methods._sparse: one trained delta vector per matrix
holding exactly the selected entries), with the same trainable set and optimizer state, but dense compute.
The export folds the deltas into a plain model and writes s2ft_selection.json.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ftlab.config.bounds import at_least, choice
from ftlab.config.registry import ConfigError
from ftlab.methods.base import METHODS, Method, MethodConfig, MethodContext

if TYPE_CHECKING:
    import torch
    from torch import nn

S2FT_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
S2FT_FFN_MODULES = ("gate_proj", "up_proj", "down_proj")


@dataclass
class S2ftConfig(MethodConfig):
    """S2FT: per block, `heads` attention heads and `channels` FFN channels (a seeded draw) train; masked."""

    name: str = "s2ft"
    heads: int = 2  # attention heads per block
    channels: int = 32  # FFN (intermediate) channels per block
    # the head's rows in q/k/v_proj (k/v: the key-value head that serves it) and its columns in o_proj
    attn_modules: list[str] = field(default_factory=lambda: ["v_proj", "o_proj"])
    # the channel's rows in gate/up_proj and its column in down_proj
    ffn_modules: list[str] = field(default_factory=lambda: ["up_proj", "down_proj"])

    def check(self) -> None:
        super().check()
        at_least("method.heads", self.heads, 0)
        at_least("method.channels", self.channels, 0)
        for key, valid in (("attn_modules", S2FT_ATTN_MODULES), ("ffn_modules", S2FT_FFN_MODULES)):
            for m in getattr(self, key):
                choice(f"method.{key}", m, valid)
        if not (self.heads and self.attn_modules) and not (self.channels and self.ffn_modules):
            raise ConfigError("method.heads: nothing trains; set method.heads >= 1 with method.attn_modules, or "
                              "method.channels >= 1 with method.ffn_modules")


def _find(layer: nn.Module, mod: str, i: int, key: str) -> tuple[str, nn.Linear]:
    from torch import nn

    found = [(n, m) for n, m in layer.named_modules() if n.rsplit(".", 1)[-1] == mod and isinstance(m, nn.Linear)]
    if len(found) != 1:
        raise ValueError(f"method.{key}: block {i} has {len(found)} linear layers named {mod!r}; "
                         "S2FT needs exactly one")
    return found[0]


def rows_index(rows: list[int], shape: torch.Size) -> torch.Tensor:
    """Flat (row-major) indices of whole rows of a (out, in) matrix."""
    import torch

    r = torch.tensor(rows, dtype=torch.long)
    return (r[:, None] * shape[1] + torch.arange(shape[1])).reshape(-1)


def cols_index(cols: list[int], shape: torch.Size) -> torch.Tensor:
    """Flat (row-major) indices of whole columns of a (out, in) matrix."""
    import torch

    c = torch.tensor(cols, dtype=torch.long)
    return (torch.arange(shape[0])[:, None] * shape[1] + c).reshape(-1)


def _span(units: list[int], width: int) -> list[int]:
    return [u * width + j for u in units for j in range(width)]


@METHODS.register("s2ft", config=S2ftConfig)
class S2ft(Method):
    name = "s2ft"

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        from ftlab.methods._sparse import attach, selection_summary
        from ftlab.models.structure import decoder_layers

        c = self.cfg
        conf = model.config
        n_heads = conf.num_attention_heads
        n_kv = getattr(conf, "num_key_value_heads", None) or n_heads
        head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // n_heads
        group = n_heads // n_kv
        prefix, layers = decoder_layers(model)
        rng = random.Random(f"s2ft:{ctx.seed}")
        index: dict[str, torch.Tensor] = {}
        self.selection: dict[int, dict[str, list[int]]] = {}
        for i, layer in enumerate(layers):
            heads = sorted(rng.sample(range(n_heads), min(c.heads, n_heads))) if c.attn_modules else []
            kv = sorted({h // group for h in heads})
            ffn = {m: _find(layer, m, i, "ffn_modules") for m in c.ffn_modules}
            inter = None
            for m, (_, lin) in ffn.items():
                inter = lin.in_features if m == "down_proj" else lin.out_features
            channels = sorted(rng.sample(range(inter), min(c.channels, inter))) if inter else []
            self.selection[i] = {"heads": heads, "kv_heads": kv, "channels": channels}
            for m in c.attn_modules if heads else []:
                name, lin = _find(layer, m, i, "attn_modules")
                shape = lin.weight.shape
                if m == "o_proj":
                    idx = cols_index(_span(heads, head_dim), shape)
                else:
                    idx = rows_index(_span(heads if m == "q_proj" else kv, head_dim), shape)
                index[f"{prefix}.{i}.{name}"] = idx
            for m, (name, lin) in ffn.items() if channels else []:
                shape = lin.weight.shape
                idx = cols_index(channels, shape) if m == "down_proj" else rows_index(channels, shape)
                index[f"{prefix}.{i}.{name}"] = idx
        attach(model, {n: idx.sort().values for n, idx in index.items()})
        self.summary = selection_summary(model)
        return model

    def report(self) -> dict:
        return {"optimizer_state": "sparse: AdamW moments for the selected rows/columns only (masked S2FT: dense "
                                   "compute, no partial back-propagation)",
                "selected": self.summary, "selection": {str(i): s for i, s in self.selection.items()}}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from ftlab.methods._sparse import export_merged

        export_merged(model, out_dir)
        sel = {"heads": self.cfg.heads, "channels": self.cfg.channels, "attn_modules": self.cfg.attn_modules,
               "ffn_modules": self.cfg.ffn_modules, "blocks": {str(i): s for i, s in self.selection.items()}}
        (Path(out_dir) / "s2ft_selection.json").write_text(json.dumps(sel, indent=1) + "\n")
