"""HFT: Half Fine-Tuning (Hui et al., 2024, arXiv:2404.18466).

In each training stage half of the parameters are chosen to learn the new task and the other half stay frozen
to keep earlier knowledge; the choice is made per block and per category ("category-level" in the paper's
Llama figure). In every transformer block: half of the attention matrices (q/k/v/o: 2 of 4), half of the norms
and half of the FFN matrices (gate/up/down). A category whose half is not whole (FFN: 1.5 of 3) gets the larger
count in a seeded random half of the blocks and the smaller in the rest (the paper: half of the layers update two
FFN matrices, the others one; gucci-j/ssu training/src/utils/model_utils.py `_freeze_hft_parameters` shuffles the
layer indices), so the model trains exactly half of each category. Which blocks, and which units in each, is a
seeded draw from (run seed, `stage`): a new stage re-draws (`method.stage`, or `on_stage_start` of a continual run,
data=[a,b,c]: stage k draws with method.stage + k).

Categories go by what a unit is, not only by where it sits: a module named or typed as a norm is a norm (Llama's
input/post_attention_layernorm, Qwen3's and OLMo-2's q_norm/k_norm inside the attention, Gemma's pre/post
feed-forward norms); otherwise a unit under an attention module is attention, under an MLP / feed-forward / MoE
module is FFN, and anything else in the block is its own category `other`, halved the same way.

Embeddings, head and final norm train (`train_embeddings`, `train_head`: true): HFT selects within the transformer
blocks only. Source: the ssu re-implementation (model_utils.py:162 and :920, "skip embeddings and lm_head to follow
the original HFT paper"; scripts/hft.sh --skip_embeddings_and_head, which leaves them out of the frozen half); the
paper's Figure 2 itself could not be checked here. The export (the whole model) also writes hft_selection.json (the
current stage's half and every stage's draw).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ftlab.config.bounds import at_least
from ftlab.config.registry import ConfigError
from ftlab.methods.base import METHODS, Method, MethodConfig, MethodContext

if TYPE_CHECKING:
    from torch import nn


@dataclass
class HftConfig(MethodConfig):
    """Half Fine-Tuning: in each block, half of the attention matrices, of the FFN matrices and of the norms train."""

    default_lr: ClassVar[float] = 1e-5  # whole weight matrices: full fine-tuning's (MethodConfig.default_lr)

    name: str = "hft"
    ratio: float = 0.5  # share of each block's matrices that train
    stage: int = 0  # the draw is seeded by (run seed, stage): a new training stage re-draws the half
    train_embeddings: bool = True  # HFT halves the blocks only; the embeddings train (gucci-j/ssu's reading)
    train_head: bool = True  # lm head and final norm

    def check(self) -> None:
        super().check()
        if not 0 < self.ratio < 1:
            raise ConfigError(f"method.ratio: must be in (0, 1), got {self.ratio!r}")
        at_least("method.stage", self.stage, 0)


NORM_WORDS = ("norm", "ln_", "ln1", "ln2")
MLP_WORDS = ("mlp", "feed_forward", "ffn", "moe", "expert")


def category(name: str, module: nn.Module | None = None) -> str:
    """`norm`, `attn`, `mlp` or `other` for a unit of a block, `name` relative to the block."""
    leaf = name.rsplit(".", 1)[-1].lower()
    kind = type(module).__name__.lower() if module is not None else ""
    if any(w in leaf for w in NORM_WORDS) or "norm" in kind:
        return "norm"
    first = name.split(".")[0].lower()
    if "attn" in first or "attention" in first:
        return "attn"
    if any(w in first for w in MLP_WORDS):
        return "mlp"
    return "other"


def block_units(layer: nn.Module) -> dict[str, list[str]]:
    """The block's selectable units by category: each module that owns parameters directly (a linear with its
    bias, a norm), named relative to the block."""
    units: dict[str, list[str]] = {}
    for name, m in layer.named_modules():
        if name and any(True for _ in m.parameters(recurse=False)):
            units.setdefault(category(name, m), []).append(name)
    return units


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


@METHODS.register("hft", config=HftConfig)
class Hft(Method):
    name = "hft"

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        self.seed = ctx.seed
        self.draws: dict[int, dict[int, dict[str, list[str]]]] = {}  # stage -> its selection (export record)
        self._draw(model, self.cfg.stage)
        return model

    def on_stage_start(self, model: nn.Module, stage: int) -> None:
        """Continual stages: stage 0 keeps the draw made in `prepare`; every later stage re-draws the half,
        seeded by (run seed, method.stage + stage), so stage k of a continual run is the draw `method.stage=k`
        gives a single run."""
        if stage > 0:
            self._draw(model, self.cfg.stage + stage)

    def _draw(self, model: nn.Module, stage: int) -> None:
        from ftlab.models.structure import decoder_layers, embedding_names, head_names, set_trainable

        prefix, layers = decoder_layers(model)
        rng = random.Random(f"hft:{self.seed}:{stage}")
        ratio = self.cfg.ratio
        units = [block_units(layer) for layer in layers]
        counts: dict[str, list[int]] = {}
        for cat in sorted({c for u in units for c in u}):  # how many units of each category each block trains
            want = [ratio * len(u.get(cat, [])) for u in units]
            base = [math.floor(w) for w in want]
            extra = _round_half_up(sum(want)) - sum(base)
            fractional = [i for i, w in enumerate(want) if w > math.floor(w)]
            plus = set(rng.sample(fractional, min(extra, len(fractional))))  # a random half of the blocks
            counts[cat] = [b + (i in plus) for i, b in enumerate(base)]
        self.selection: dict[int, dict[str, list[str]]] = {}
        names: set[str] = set()
        for i, layer in enumerate(layers):
            chosen = {}
            for cat, us in sorted(units[i].items()):
                chosen[cat] = sorted(rng.sample(us, counts[cat][i]))
                for u in chosen[cat]:
                    own = layer.get_submodule(u).named_parameters(recurse=False)
                    names |= {f"{prefix}.{i}.{u}.{p}" for p, _ in own}
            self.selection[i] = chosen
        if self.cfg.train_embeddings:
            names |= embedding_names(model)
        if self.cfg.train_head:
            names |= head_names(model)
        set_trainable(model, names)
        for p in model.parameters():
            if not p.requires_grad:
                p.grad = None
        self.stage = stage
        self.draws[stage] = self.selection

    def state_dict(self) -> dict:
        return {"stage": self.stage}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        """A checkpoint taken in a later stage restores that stage's half."""
        if int(state.get("stage", self.stage)) != self.stage:
            self._draw(model, int(state["stage"]))

    def export(self, model: nn.Module, out_dir: Path) -> None:
        super().export(model, out_dir)
        sel = {"stage": self.stage, "ratio": self.cfg.ratio, "blocks": {str(i): s for i, s in self.selection.items()},
               "stages": {str(st): {str(i): s for i, s in d.items()} for st, d in sorted(self.draws.items())}}
        (Path(out_dir) / "hft_selection.json").write_text(json.dumps(sel, indent=1) + "\n")
