"""The synthetic world's tokenizer: one token per character, built in-process (no download)."""

from __future__ import annotations

from ftlab.world.skills import SKILL_CHARS

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
# Printable ASCII and newline: the skills use 41 of these; the rest let free text (a chat template, a
# perplexity line written by hand) tokenize without <unk>. The order is fixed: token ids are part of the
# cached base model, so changing this list needs a WORLD_VERSION bump in ftlab.world.base.
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
assert SKILL_CHARS <= set(CHARS) and len(set(CHARS)) == len(CHARS)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_tokenizer():
    """A char-level `PreTrainedTokenizerFast`: specials <pad>=0, <s>=1, </s>=2, <unk>=3, then `CHARS`.

    Encoding prepends <s> (as Llama's tokenizers do); decoding glues characters back together. Padding
    side defaults to right; set ``tok.padding_side = "left"`` for batched generation.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(SPECIALS) + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Split on the empty pattern: every character becomes its own piece, whitespace included.
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
