"""The text a model reads: the prompt format (plain, or the user turn of the chat template) and what about the
tokenizer changes scores."""

from __future__ import annotations

import hashlib
import json

from ftlab.eval.task import FORMATS

__all__ = ["apply_format", "chat_texts", "adds_bos", "tokenizer_signature", "tokenizer_content"]


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


# Encoded with and without special tokens: shows whether the tokenizer adds BOS/EOS, how it normalises (case,
# accents, spaces), splits digits and parses special-token text, whatever its files say.
_PROBE = " Hello  Wörld\n\tCAFÉ 12,345.67 <s></s> a-b's"


def tokenizer_content(tokenizer) -> str:
    """sha256 of everything the tokenizer encodes with: a fast tokenizer's whole serialised pipeline (vocabulary,
    merges, normaliser, pre-tokenizer, post-processor, added tokens), else the content of its saved vocabulary
    files."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h = hashlib.sha256()
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as d:
            for f in sorted(tokenizer.save_vocabulary(d)):
                h.update(Path(f).name.encode() + b"\0" + Path(f).read_bytes())
    return h.hexdigest()


def tokenizer_signature(tokenizer, fmt: str = "plain") -> dict:
    """What about the tokenizer can change a score: its content (`tokenizer_content`), special tokens and their
    ids, what it makes of a probe text with and without special tokens (adds BOS/EOS, normalisation), its size,
    padding/truncation sides and chat template. Not its name: a tokenizer under the same name can change (a hub
    revision, a replaced local file), and the same one under another path changes nothing. `fmt` is kept for
    callers; the template counts whatever the format."""
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, dict):
        tmpl = json.dumps(tmpl, sort_keys=True)
    special = {k: str(v) for k, v in sorted((getattr(tokenizer, "special_tokens_map", None) or {}).items())}
    return {"content": tokenizer_content(tokenizer), "size": len(tokenizer),
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "special": special,
            "special_ids": sorted(int(i) for i in getattr(tokenizer, "all_special_ids", []) or []),
            "probe": tokenizer(_PROBE, add_special_tokens=True)["input_ids"],
            "probe_plain": tokenizer(_PROBE, add_special_tokens=False)["input_ids"],
            "padding_side": getattr(tokenizer, "padding_side", None),
            "truncation_side": getattr(tokenizer, "truncation_side", None),
            "chat_template": hashlib.sha256(tmpl.encode()).hexdigest()[:16] if isinstance(tmpl, str) else None}
