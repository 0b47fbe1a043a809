"""The text a model reads: the prompt format (plain, or the user turn of the chat template) and what about the
tokenizer changes scores."""

from __future__ import annotations

import hashlib

from ftlab.eval.task import FORMATS

__all__ = ["apply_format", "chat_texts", "adds_bos", "tokenizer_signature"]


def apply_format(tokenizer, text: str, fmt: str) -> str:
    """The text fed to the model: as is (plain), or as the user turn of the tokenizer's chat template followed
    by the assistant's generation prompt (chat; a leading BOS the tokenizer adds itself is not doubled)."""
    if fmt == "plain":
        return text
    if fmt != "chat":
        raise ValueError(f"unknown prompt format {fmt!r}; valid: {', '.join(FORMATS)}")
    return _chat(tokenizer, [{"role": "user", "content": text}], generation_prompt=True)


def chat_texts(tokenizer, prompt: str, response: str) -> tuple[str, str]:
    """A training row in the chat format, as text: (the prompt exactly as `apply_format(..., "chat")` renders it
    for evaluation, the whole conversation: the prompt as the user turn, the response, stripped, as the assistant
    turn). The conversation starts with the prompt's text; a template that renders an assistant turn otherwise
    than after its own generation prompt is refused (ValueError)."""
    p = apply_format(tokenizer, prompt, "chat")
    full = _chat(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response.strip()}],
                 generation_prompt=False)
    if not full.startswith(p):
        raise ValueError("model.prompt_format=chat: the tokenizer's chat template does not render the assistant turn "
                         f"right after its generation prompt ({p[-40:]!r} vs {full[len(p) - 40:len(p)]!r}), so the "
                         "answer cannot be told from the prompt; use model.prompt_format=plain")
    return p, full


def _chat(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt format 'chat': the tokenizer has no chat template; use format=plain")
    s = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    bos = tokenizer.bos_token
    if bos and s.startswith(bos) and adds_bos(tokenizer):
        s = s[len(bos):]
    return s


def adds_bos(tokenizer) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def tokenizer_signature(tokenizer, fmt: str = "plain") -> dict:
    """What about the tokenizer changes scores: its name, size, special ids and (chat) template."""
    tmpl = getattr(tokenizer, "chat_template", None) if fmt == "chat" else None
    return {"name": getattr(tokenizer, "name_or_path", ""), "size": len(tokenizer),
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
            "chat_template": hashlib.sha256(tmpl.encode()).hexdigest()[:16] if isinstance(tmpl, str) else None}
