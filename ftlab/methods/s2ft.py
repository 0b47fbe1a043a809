"""S2FT: Structured Sparse Fine-Tuning (Yang et al., 2024, "S²FT: Efficient, Scalable and Generalizable LLM
Fine-tuning by Structured Sparsity", NeurIPS 2024, arXiv:2412.06289).

As the official code (Infini-AI-Lab/S2FT experiments/train/finetune.py `--v_ratio/--o_ratio/--u_ratio/--d_ratio`,
experiments/utils/s2_utils.py): whole heads and FFN channels of chosen matrices train, each kind drawn on its own:
- `o_ratio`: query heads whose columns of o_proj train; `v_ratio`: key-value heads whose rows of v_proj train;
- `d_ratio`: FFN channels whose columns of down_proj train; `u_ratio`: channels whose rows of up_proj train.
A ratio is a share of all such units of the model (heads x blocks, channels x blocks), drawn globally
(`random.sample` over every block's units), so the count per block varies. v and o (u and d) are independent draws;
q, k and gate never train. Every official experiment trains only the output side: Llama-2 o_ratio 0.052 + d_ratio
0.02 (the defaults here), Llama-3 d_ratio 0.03 (experiments/train_script/*_s2.sh); v_ratio = u_ratio = 0.
The reference truncates the count (`int(...)`); ftlab rounds it and gives at least one unit to a ratio > 0 (the tiny
world's 16 heads x 0.052 would truncate to none).

Compute: the official code co-permutes the selected heads/channels into contiguous blocks (S2RowLinear /
S2ColumnLinear) so that the trained block multiplies a slice of the input or output and backward forms only that
block's gradient. ftlab gets the same partial back-propagation without moving weights: the trained block sits beside
the frozen linear (ftlab.methods._sparse.SliceDelta) and multiplies `x.index_select(-1, columns)` or adds into
`y[..., rows]`; no gradient of the frozen weight is formed and only the selected input slice is kept for backward.
The permutation itself (contiguous slices instead of a gather) is not done; it changes no number. The export folds
the blocks into a plain model and writes s2ft_selection.json.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ftlab.config.registry import ConfigError
from ftlab.methods.base import METHODS, Method, MethodConfig, MethodContext

if TYPE_CHECKING:
    from torch import nn

# kind -> (module, axis of the weight that is sliced: 0 rows, 1 columns, unit: head | kv_head | channel)
S2FT_KINDS = {"v": ("v_proj", 0, "kv_head"), "o": ("o_proj", 1, "head"),
              "u": ("up_proj", 0, "channel"), "d": ("down_proj", 1, "channel")}


@dataclass
class S2ftConfig(MethodConfig):
    """S2FT: shares of all heads (o_proj columns, v_proj rows) and FFN channels (down_proj columns, up_proj rows),
    each drawn on its own across the model; the defaults train the output side as the official experiments."""

    name: str = "s2ft"
    v_ratio: float = 0.0  # key-value heads whose v_proj rows train, share of kv heads x blocks
    o_ratio: float = 0.052  # query heads whose o_proj columns train, share of heads x blocks (Llama-2 recipe)
    u_ratio: float = 0.0  # FFN channels whose up_proj rows train, share of channels x blocks
    d_ratio: float = 0.02  # FFN channels whose down_proj columns train (Llama-2 recipe; Llama-3: 0.03 alone)

    def check(self) -> None:
        super().check()
        for k in S2FT_KINDS:
            v = getattr(self, f"{k}_ratio")
            if not 0 <= v <= 1:
                raise ConfigError(f"method.{k}_ratio: must be in [0, 1] (a share of the model's units), got {v!r}")
        if not any(getattr(self, f"{k}_ratio") for k in S2FT_KINDS):
            raise ConfigError("method.o_ratio: nothing trains; set at least one of method.o_ratio, d_ratio, v_ratio, "
                              "u_ratio > 0 (the official experiments: o_ratio 0.052 and d_ratio 0.02, or d_ratio 0.03)")


def _find(layer: nn.Module, mod: str, i: int) -> tuple[str, nn.Linear]:
    from torch import nn

    found = [(n, m) for n, m in layer.named_modules() if n.rsplit(".", 1)[-1] == mod and isinstance(m, nn.Linear)]
    if len(found) != 1:
        raise ValueError(f"method=s2ft: block {i} has {len(found)} linear layers named {mod!r}; S2FT needs exactly one")
    return found[0]


def unit_count(ratio: float, total: int) -> int:
    """Units a ratio selects: rounded, at least one for a ratio > 0 (the reference truncates)."""
    return 0 if ratio <= 0 else min(total, max(1, int(ratio * total + 0.5)))


@METHODS.register("s2ft", config=S2ftConfig)
class S2ft(Method):
    name = "s2ft"

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        import torch

        from ftlab.methods._sparse import attach_slices, selection_summary
        from ftlab.models.structure import decoder_layers

        conf = model.config
        n_heads = conf.num_attention_heads
        n_kv = getattr(conf, "num_key_value_heads", None) or n_heads
        head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // n_heads
        prefix, layers = decoder_layers(model)
        n_layers = len(layers)
        rng = random.Random(f"s2ft:{ctx.seed}")
        self.selection: dict[int, dict[str, list[int]]] = {i: {} for i in range(n_layers)}
        self.counts: dict[str, int] = {}
        slices: dict[str, tuple[int, torch.Tensor]] = {}
        for kind, (mod, axis, unit) in S2FT_KINDS.items():
            ratio = getattr(self.cfg, f"{kind}_ratio")
            if ratio <= 0:
                continue
            linears = [_find(layer, mod, i) for i, layer in enumerate(layers)]
            per_layer = {"head": n_heads, "kv_head": n_kv}.get(unit)
            if per_layer is None:  # channels: the intermediate width
                lin = linears[0][1]
                per_layer = lin.out_features if axis == 0 else lin.in_features
            n = unit_count(ratio, per_layer * n_layers)
            self.counts[kind] = n
            picked = sorted(rng.sample(range(per_layer * n_layers), n))  # global, as the reference's random.sample
            for i in range(n_layers):
                units = [g % per_layer for g in picked if g // per_layer == i]
                self.selection[i][f"{kind}_{unit}s"] = units
                if not units:
                    continue
                width = 1 if unit == "channel" else head_dim
                idx = torch.tensor([u * width + j for u in units for j in range(width)], dtype=torch.long)
                slices[f"{prefix}.{i}.{linears[i][0]}"] = (axis, idx)
        attach_slices(model, slices)
        self.summary = selection_summary(model)
        return model

    def report(self) -> dict:
        return {"optimizer_state": "sparse: AdamW moments for the selected rows/columns only; partial back-"
                                   "propagation (no gradient of the frozen weights, only the selected input slice "
                                   "kept)",
                "units": self.counts, "selected": self.summary,
                "selection": {str(i): s for i, s in self.selection.items()}}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from ftlab.methods._sparse import export_merged

        export_merged(model, out_dir)
        c = self.cfg
        sel = {**{f"{k}_ratio": getattr(c, f"{k}_ratio") for k in S2FT_KINDS}, "units": self.counts,
               "blocks": {str(i): s for i, s in self.selection.items()}}
        (Path(out_dir) / "s2ft_selection.json").write_text(json.dumps(sel, indent=1) + "\n")
