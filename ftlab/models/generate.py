"""Batched greedy decoding with a KV cache, for any HF causal LM (peft-wrapped too)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ftlab.models.structure import eval_mode, model_device, pad_id
from ftlab.utils.padding import left_pad, length_batches


def _eos_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is not None:  # chat models often stop on several ids (e.g. <|im_end|> and <|endoftext|>)
        ids.update([eos] if isinstance(eos, int) else eos)
    return sorted(ids)


@torch.inference_mode()
def _decode_batch(model, enc: list[list[int]], max_new_tokens: int, pad: int, eos: torch.Tensor,
                  device: torch.device, stopped: Optional[Callable[[list[int]], bool]] = None) -> list[list[int]]:
    """Greedy continuation token ids of one batch of tokenized prompts. A row ends at its first eos (dropped) or,
    with `stopped`, at the first token after which `stopped(its tokens so far)` holds (kept)."""
    b = len(enc)
    ids, mask = left_pad(enc, pad, device)  # left padding: every row's next token lands in the same column
    # Positions count real tokens only, so a left-padded row sees the same positions as it would alone.
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    try:
        # Only the last position's logits: a full [b, width, vocab] tensor is gigabytes for a real model's
        # vocabulary and a long prompt.
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    except TypeError:  # a model whose forward predates `logits_to_keep`
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    cache = out.cache
    next_pos = pos[:, -1:] + 1
    done = torch.zeros(b, dtype=torch.bool, device=device)
    new = []
    rows: list[list[int]] = [[] for _ in range(b)]
    ends = [max_new_tokens] * b  # tokens kept per row before its eos cut
    for step in range(max_new_tokens):
        tok = out.logits[:, -1, :].argmax(-1)  # [b]
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        new.append(tok)
        done |= torch.isin(tok, eos)
        if stopped is not None:
            # A row that wrote a stop string is finished: what it would generate next is cut anyway, and lm-eval
            # (at batch size 1) stops it here too, so a stop written as a special token ends it as there.
            flags, finished = [], done.tolist()
            for i, t in enumerate(tok.tolist()):
                if ends[i] == max_new_tokens and not finished[i]:
                    rows[i].append(t)
                    if stopped(rows[i]):
                        ends[i] = step + 1
                flags.append(ends[i] < max_new_tokens)
            done |= torch.tensor(flags, dtype=torch.bool, device=device)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, cache=cache, use_cache=True)
        cache = out.cache
        next_pos = next_pos + 1
    gen = torch.stack(new, dim=1).tolist()  # [b, steps]
    eos_set = set(eos.tolist())
    result = []
    for row, end in zip(gen, ends):
        row = row[:end]
        cut = next((j for j, t in enumerate(row) if t in eos_set), len(row))
        result.append(row[:cut])
    return result


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (lm-eval's `until`; the stop string itself dropped)."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(cuts)] if cuts else text


def greedy_decode(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
                  progress: Optional[Callable[[int], None]] = None, stop: Sequence[str] = (),
                  max_prompt_tokens: Optional[int] = None) -> list[str]:
    """Greedy continuations of `prompts`, batched, with a KV cache.

    Prompts are tokenized with the tokenizer's special tokens (e.g. a leading <s>), sorted by length so a
    batch holds similar lengths (ftlab.utils.padding.length_batches: at most batch_size prompts, padding at most
    MAX_PADDING of a batch's prompt positions), left-padded, and decoded until every row has produced an eos token or
    `max_new_tokens` tokens. The model's train/eval mode is restored afterwards.

    Args:
        model: a HF causal LM (``model(input_ids, attention_mask, position_ids, cache)``: transformers' current
            cache keyword; ``past_key_values`` is deprecated), e.g. ``LlamaForCausalLM`` or a peft ``PeftModel``
            around one (peft passes ``cache`` through to the model).
        tokenizer: its tokenizer; needs a pad or eos token.
        prompts: the prompts, as text.
        max_new_tokens: cap on generated tokens per prompt (eos included).
        batch_size: prompts per forward pass.
        progress: called with the number of prompts finished after each batch.
        max_prompt_tokens: a prompt longer than this keeps its last `max_prompt_tokens` tokens (left truncation,
            as lm-eval's HF backend cuts to the window minus the generation budget); None: no cut.
        stop: strings that end a continuation, as lm-eval's `until` (plus the eos token's text, as lm-eval adds):
            a row stops generating once its tokens, decoded with special tokens, contain one, and its text is cut
            at the first (rows are independent, so what a row generates after its stop cannot change what comes
            before it).

    Returns:
        The decoded continuations, in the order of `prompts`, without the prompt, eos or special tokens.
    """
    if not prompts:
        return []
    if max_new_tokens < 1:
        return [""] * len(prompts)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError("greedy_decode: the tokenizer has neither a pad nor an eos token")
    pad, device = pad_id(tokenizer), model_device(model)
    eos_ids = _eos_ids(model, tokenizer)
    eos = torch.tensor(eos_ids or [-1], dtype=torch.long, device=device)
    stopped = None
    if stop:
        # lm-eval's HF backend adds the eos token's text to `until` (handle_stop_sequences) and checks the stop
        # strings on the generated tokens decoded with their special tokens, then cuts the text decoded without
        # them at the first stop: the same two steps here.
        eos_text = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False) \
            if tokenizer.eos_token_id is not None else ""
        stop = [s for s in dict.fromkeys([*stop, eos_text]) if s]

        def stopped(row: list[int]) -> bool:
            text = tokenizer.decode(row, skip_special_tokens=False)
            return any(s in text for s in stop)
    enc = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    if max_prompt_tokens is not None:
        enc = [e[-max_prompt_tokens:] if len(e) > max_prompt_tokens else e for e in enc]
    outputs: list[Optional[str]] = [None] * len(prompts)
    with eval_mode(model):
        for idx in length_batches([len(e) for e in enc], batch_size):  # prompt padding <= MAX_PADDING a batch
            rows = _decode_batch(model, [enc[i] for i in idx], max_new_tokens, pad, eos, device, stopped)
            texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
            for i, t in zip(idx, texts):
                outputs[i] = cut_at_stop(t, stop)
            if progress is not None:
                progress(len(idx))
    return outputs  # type: ignore[return-value]
