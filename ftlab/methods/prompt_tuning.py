"""Prompt tuning (Lester et al., 2021, arXiv:2104.08691): a trained soft prompt, through peft.

`num_virtual_tokens` embeddings (peft's PromptEmbedding) are prepended to every input; the model is frozen.
Init: `vocab` (embeddings of random vocabulary tokens, peft's SAMPLE_VOCAB), `random`, or `text` (embeddings of
`init_text`'s tokens, repeated or cut to length: peft's TEXT init, done here with the run's tokenizer because
peft would load one by name).

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
from typing import TYPE_CHECKING, Optional

from ftlab.config.bounds import at_least, choice
from ftlab.config.registry import ConfigError
from ftlab.methods.base import METHODS, Method, MethodConfig, MethodContext

if TYPE_CHECKING:
    import peft
    from torch import nn

PROMPT_INITS = ("vocab", "random", "text")


@dataclass
class PromptTuningConfig(MethodConfig):
    """Prompt tuning: trained soft-prompt embeddings prepended to every input; the model is frozen."""

    name: str = "prompt_tuning"
    num_virtual_tokens: int = 16
    init: str = "vocab"  # vocab: embeddings of random vocabulary tokens | random | text: embeddings of init_text
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

        inits = {"vocab": peft.PromptTuningInit.SAMPLE_VOCAB, "random": peft.PromptTuningInit.RANDOM,
                 "text": peft.PromptTuningInit.RANDOM}  # text: RANDOM, then overwritten from the tokenizer below
        c = self.cfg
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=c.num_virtual_tokens,
                                       prompt_tuning_init=inits[c.init])

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        import peft

        from ftlab.methods._prompt import PromptTunedLM

        pm = peft.get_peft_model(model, self.peft_config())
        if self.cfg.init == "text":
            self._init_from_text(pm, ctx.tokenizer)
        return PromptTunedLM(pm)

    def _init_from_text(self, pm, tokenizer) -> None:
        import torch

        n = self.cfg.num_virtual_tokens
        ids = tokenizer(self.cfg.init_text)["input_ids"]
        if not ids:
            raise ValueError(f"method.init_text: {self.cfg.init_text!r} tokenizes to nothing")
        ids = (ids * math.ceil(n / len(ids)))[:n]
        emb = pm.word_embeddings
        with torch.no_grad():
            weight = emb(torch.tensor(ids, device=emb.weight.device)).float()
            pm.prompt_encoder["default"].embedding.weight.copy_(weight)

    def export(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)  # the prompt embeddings; reload with PeftModel.from_pretrained + PromptTunedLM


def __getattr__(name: str):
    """`from ftlab.methods.prompt_tuning import PromptTunedLM` (imports torch only then)."""
    if name == "PromptTunedLM":
        from ftlab.methods._prompt import PromptTunedLM

        return PromptTunedLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
