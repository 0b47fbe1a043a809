"""Model-structure helpers, one copy each: where the blocks, embeddings and head are (the partial-freezing methods),
setting `requires_grad` by parameter name, the pad id, the model's device and eval mode (evaluation, generation,
probes, diagnostics)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the transformer blocks: the longest ModuleList named `layers`, `h` or
    `blocks` (Llama/Qwen/Mistral: model.layers; GPT-2: transformer.h)."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks") and len(m)]
    if not found:
        raise ValueError(f"{type(model).__name__}: no list of transformer blocks (model.layers / transformer.h) found")
    return max(found, key=lambda nm: len(nm[1]))


def layer_param_names(model: nn.Module) -> list[list[str]]:
    """Parameter names of each block, bottom to top."""
    prefix, layers = decoder_layers(model)
    return [[f"{prefix}.{i}.{n}" for n, _ in layer.named_parameters()] for i, layer in enumerate(layers)]


def embedding_names(model: nn.Module) -> set[str]:
    return _names_of(model, model.get_input_embeddings())


def head_names(model: nn.Module) -> set[str]:
    """The lm head and every other parameter outside the blocks and the input embeddings (the final norm)."""
    in_layers = {n for names in layer_param_names(model) for n in names}
    emb = embedding_names(model)
    out = _names_of(model, model.get_output_embeddings()) if model.get_output_embeddings() is not None else set()
    rest = {n for n, _ in model.named_parameters() if n not in in_layers and n not in emb}
    return out | rest


def _names_of(model: nn.Module, module: nn.Module | None) -> set[str]:
    if module is None:
        return set()
    ids = {id(p) for p in module.parameters()}
    # named_parameters() lists a tied parameter once, under its first name
    return {n for n, p in model.named_parameters() if id(p) in ids}


def set_trainable(model: nn.Module, names: set[str]) -> None:
    """Exactly the parameters named in `names` train (a tied parameter trains if any of its names is listed)."""
    params = dict(model.named_parameters())
    unknown = names - set(params)
    if unknown:
        raise KeyError(f"not parameters of the model: {sorted(unknown)[:3]}")
    for n, p in params.items():
        p.requires_grad_(n in names)


def resolve_device(hw) -> str:
    import torch

    if hw.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if hw.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("hw.device=cuda but no CUDA device is visible; use hw=cpu")
    return hw.device


def pad_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS (Llama-style tokenizers have no pad), else 0.
    Padded positions are masked out everywhere, so the choice never changes a number."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


def model_device(model) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block; its train/eval mode as it was afterwards, also on an error."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
