"""Prompt tuning (Lester et al., 2021, arXiv:2104.08691): a trained soft prompt, through peft.

`num_virtual_tokens` embeddings (peft's PromptEmbedding) are prepended to every input; the model is frozen.
Init: `vocab` (embeddings of tokens drawn from the `VOCAB_POOL` = 5,000 most frequent ones, never special tokens, as
Lester et al. sample from the 5,000 most common tokens of T5's vocabulary; here the frequencies are the training
rows' token counts, a proxy for the pretraining corpus's), `random` (peft's RANDOM: N(0, 1)), or `text` (embeddings
of `init_text`'s tokens, repeated or cut to length: peft's TEXT init, done here with the run's tokenizer because
peft would load one by name). peft's own SAMPLE_VOCAB draws uniformly from the whole vocabulary, special and unused
tokens included; ftlab does not use it.

peft's own forward for prompt tuning returns logits for the virtual tokens too and prepends the prompt again on
every cached decoding step; ftlab's loop and its greedy decoder call `model(input_ids, attention_mask,
position_ids, cache)` like a plain causal LM. `PromptTunedLM` (in ftlab.methods._prompt, importable
from here too) is the thin adapter between the two: it uses peft's prompt encoder and base model, prepends the
prompt on the first (uncached) call only, shifts positions and the attention mask by the prompt length, and
returns logits for the real tokens only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Optional

from ftlab.config.bounds import at_least, choice
from ftlab.config.registry import ConfigError
from ftlab.methods.base import METHODS, Method, MethodConfig, MethodContext

if TYPE_CHECKING:
    import peft
    from torch import nn

PROMPT_INITS = ("vocab", "random", "text")
VOCAB_POOL = 5000  # Lester et al. (2021), section 3: prompts "sampled from the 5,000 most common tokens"
COUNT_ROWS = 20_000  # token counts are taken over at most this many training rows (the first, in stream order)


@dataclass
class PromptTuningConfig(MethodConfig):
    """Prompt tuning: trained soft-prompt embeddings prepended to every input; the model is frozen."""

    name: str = "prompt_tuning"
    # x lr_scale 30 = 3e-2 under AdamW, the PEFT prompt-tuning guide's (docs/source/task_guides/
    # prompt_based_methods.md); Lester et al. train at 0.3 with Adafactor (r-three/t-few configs: 3e-1)
    default_lr: ClassVar[float] = 1e-3
    num_virtual_tokens: int = 16
    init: str = "vocab"  # vocab: embeddings of tokens among the 5,000 most frequent | random | text: of init_text
    init_text: Optional[str] = None

    def check(self) -> None:
        super().check()
        at_least("method.num_virtual_tokens", self.num_virtual_tokens, 1)
        choice("method.init", self.init, PROMPT_INITS)
        if self.init == "text" and not self.init_text:
            raise ConfigError("method.init_text: method.init=text needs the text, e.g. method.init_text='Answer:'")


@METHODS.register("prompt_tuning", config=PromptTuningConfig)
class PromptTuning(Method):
    name = "prompt_tuning"

    def peft_config(self) -> peft.PromptTuningConfig:
        import peft

        # vocab and text: RANDOM, then overwritten in `prepare` from the run's tokenizer and training rows
        c = self.cfg
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=c.num_virtual_tokens,
                                       prompt_tuning_init=peft.PromptTuningInit.RANDOM)

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        import peft

        from ftlab.methods._prompt import PromptTunedLM

        pm = peft.get_peft_model(model, self.peft_config())
        self.init_ids: list[int] | None = None
        if self.cfg.init == "text":
            self._set_prompt(pm, self._text_ids(ctx.tokenizer))
        elif self.cfg.init == "vocab":
            self._set_prompt(pm, self._vocab_ids(ctx, pm.word_embeddings.num_embeddings))
        return PromptTunedLM(pm)

    def _text_ids(self, tokenizer) -> list[int]:
        n = self.cfg.num_virtual_tokens
        ids = tokenizer(self.cfg.init_text)["input_ids"]
        if not ids:
            raise ValueError(f"method.init_text: {self.cfg.init_text!r} tokenizes to nothing")
        return (ids * math.ceil(n / len(ids)))[:n]

    def _vocab_ids(self, ctx: MethodContext, n_embeddings: int) -> list[int]:
        """`num_virtual_tokens` ids drawn uniformly (seeded; without repeats while the pool lasts) from the pool of
        the VOCAB_POOL most frequent non-special tokens of the training rows; with no training rows, from every
        non-special token of the vocabulary."""
        import torch

        pool = frequent_token_ids(ctx.tokenizer, ctx.train_rows)
        self.pool_source = "training rows" if pool else "vocabulary (no training rows)"
        if not pool:
            special = set(ctx.tokenizer.all_special_ids)
            pool = [i for i in range(min(n_embeddings, len(ctx.tokenizer))) if i not in special]
        self.pool_size = len(pool)
        n = self.cfg.num_virtual_tokens
        g = torch.Generator().manual_seed(ctx.seed * 7919 + 29)
        picks = (torch.randperm(len(pool), generator=g)[:n] if n <= len(pool)
                 else torch.randint(len(pool), (n,), generator=g))
        return [pool[i] for i in picks.tolist()]

    def _set_prompt(self, pm, ids: list[int]) -> None:
        import torch

        self.init_ids = list(ids)
        emb = pm.word_embeddings
        with torch.no_grad():
            weight = emb(torch.tensor(ids, device=emb.weight.device)).float()
            pm.prompt_encoder["default"].embedding.weight.copy_(weight)

    def report(self) -> dict:
        if self.cfg.init != "vocab" or getattr(self, "init_ids", None) is None:
            return {}
        return {"init_pool": {"size": self.pool_size, "from": self.pool_source}, "init_token_ids": self.init_ids}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)  # the prompt embeddings; reload with PeftModel.from_pretrained + PromptTunedLM


def frequent_token_ids(tokenizer, rows: list[dict], k: int = VOCAB_POOL, max_rows: int = COUNT_ROWS) -> list[int]:
    """The `k` most frequent token ids of the rows' prompts and responses (the first `max_rows` rows; ties: the
    lower id first), special tokens never."""
    from collections import Counter

    texts = [t for r in rows[:max_rows] for t in (r.get("prompt", ""), r.get("response", "")) if t]
    if not texts:
        return []
    special = set(tokenizer.all_special_ids)
    counts = Counter(i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids
                     if i not in special)
    return [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def __getattr__(name: str):
    """`from ftlab.methods.prompt_tuning import PromptTunedLM` (imports torch only then)."""
    if name == "PromptTunedLM":
        from ftlab.methods._prompt import PromptTunedLM

        return PromptTunedLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
