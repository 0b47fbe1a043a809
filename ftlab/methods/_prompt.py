"""The module behind prompt tuning (ftlab.methods.prompt_tuning): it subclasses nn.Module, so it lives apart from
the method's torch-free module (discovery skips modules starting with `_`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    import peft


class PromptTunedLM(nn.Module):
    """A peft prompt-tuning model behind the plain causal-LM call signature (logits aligned to input_ids)."""

    def __init__(self, peft_model: peft.PeftModel):
        super().__init__()
        self.peft_model = peft_model

    @property
    def num_virtual_tokens(self) -> int:
        return self.peft_model.active_peft_config.num_virtual_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, past_key_values=None, **kwargs):
        """`cache`: transformers' KV cache keyword (`past_key_values`, its deprecated name, is taken too)."""
        cache = cache if cache is not None else past_key_values
        pm = self.peft_model
        n, b = self.num_virtual_tokens, input_ids.shape[0]
        embeds = pm.word_embeddings(input_ids)
        first = cache is None or cache.get_seq_length() == 0
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
                            cache=cache, **kwargs)
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
