"""Prompt tuning (Lester et al., 2021, arXiv:2104.08691): a trained soft prompt, through peft.

`num_virtual_tokens` embeddings (peft's PromptEmbedding) are prepended to every input; the model is frozen.
Init: `vocab` (embeddings of random vocabulary tokens, peft's SAMPLE_VOCAB), `random`, or `text` (embeddings of
`init_text`'s tokens, repeated or cut to length: peft's TEXT init, done here with the run's tokenizer because
peft would load one by name).

peft's own forward for prompt tuning returns logits for the virtual tokens too and prepends the prompt again on
every cached decoding step; ftlab's loop and its greedy decoder call `model(input_ids, attention_mask,
position_ids, past_key_values)` like a plain causal LM. `PromptTunedLM` is the thin adapter between the two: it
uses peft's prompt encoder and base model, prepends the prompt on the first (uncached) call only, shifts
positions and the attention mask by the prompt length, and returns logits for the real tokens only.
"""

from __future__ import annotations

import math
from pathlib import Path

import peft
import torch
from torch import nn

from ftlab.methods.base import Method, MethodContext

_INITS = {"vocab": peft.PromptTuningInit.SAMPLE_VOCAB, "random": peft.PromptTuningInit.RANDOM,
          "text": peft.PromptTuningInit.RANDOM}  # text: RANDOM, then overwritten from the tokenizer below


class PromptTunedLM(nn.Module):
    """A peft prompt-tuning model behind the plain causal-LM call signature (logits aligned to input_ids)."""

    def __init__(self, peft_model: peft.PeftModel):
        super().__init__()
        self.peft_model = peft_model

    @property
    def num_virtual_tokens(self) -> int:
        return self.peft_model.active_peft_config.num_virtual_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, **kwargs):
        pm = self.peft_model
        n, b = self.num_virtual_tokens, input_ids.shape[0]
        embeds = pm.word_embeddings(input_ids)
        first = past_key_values is None or past_key_values.get_seq_length() == 0
        if first:
            prompts = pm.get_prompt(batch_size=b).to(embeds.dtype)
            embeds = torch.cat((prompts, embeds), dim=1)
        if attention_mask is not None:  # the caller's mask covers the real tokens (past and current) only
            ones = torch.ones((b, n), dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat((ones, attention_mask), dim=1)
        if position_ids is not None:
            position_ids = position_ids + n
            if first:
                prefix = torch.arange(n, device=position_ids.device).expand(b, n)
                position_ids = torch.cat((prefix, position_ids), dim=1)
        out = pm.base_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, **kwargs)
        # logits of the real tokens only: the last input_ids.shape[1] positions (with `logits_to_keep`, as
        # ftlab.models.generate asks at prefill, the model returns fewer, all of them real tokens)
        out.logits = out.logits[:, -input_ids.shape[1]:]
        return out

    def save_pretrained(self, out_dir, **kwargs) -> None:
        self.peft_model.save_pretrained(out_dir, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            return getattr(self.peft_model, name)  # generation_config, config, ...


class PromptTuning(Method):
    name = "prompt_tuning"

    def peft_config(self) -> peft.PromptTuningConfig:
        c = self.cfg
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=c.num_virtual_tokens,
                                       prompt_tuning_init=_INITS[c.init])

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        pm = peft.get_peft_model(model, self.peft_config())
        if self.cfg.init == "text":
            self._init_from_text(pm, ctx.tokenizer)
        return PromptTunedLM(pm)

    def _init_from_text(self, pm, tokenizer) -> None:
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
