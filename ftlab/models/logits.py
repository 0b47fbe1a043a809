"""The output head applied a chunk of tokens at a time: the training loss and every scoring path never hold the whole
[tokens x vocabulary] logits (nor their float32 copy) at once.

    with head_split(model) as head:           # model(...).logits now holds the final hidden states [B, T, H]
        out = model(input_ids=ids, attention_mask=mask)
    nll = map_tokens(out.logits, head, token_nll, targets, chunk=chunk_positions(vocab_size(head), rows=B))

`head_split` swaps the model's output head (`get_output_embeddings()`: the lm_head, a LoRA or modules-to-save
wrapper around it, ...) for an identity in its parent for the duration of the block, so everything up to the head runs
as before (DDP's and FSDP2's hooks, peft's adapters, prompt tuning's virtual tokens, `logits_to_keep`), and yields the
head itself, which `map_tokens` then applies to `chunk` positions at a time. `head(hidden)` on the whole hidden state is
the very op the model would have run, so a single chunk gives the same bits as the model's own logits. Models that
change the logits after the head (soft-capping, logit scales) are not split: the block yields None and `.logits` are
the logits, still reduced chunk by chunk in float32.

With gradients (`checkpoint=True` while autograd records), each chunk runs under `torch.utils.checkpoint`: its logits
are recomputed in backward instead of kept, so the memory of the loss is one chunk's, not the sequence's.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import nn

__all__ = ["LOGITS_BUDGET", "head_split", "output_head", "vocab_size", "chunk_positions", "fits_at_once", "map_tokens",
           "token_nll", "token_logprob"]

# Logit elements (tokens x vocabulary) one chunk may hold: 2^24 is 64 MiB in float32 (a 128k vocabulary: 128 tokens
# per chunk; 32k: 512). Below it, everything is one chunk: the same ops as the unchunked path, bit for bit.
LOGITS_BUDGET = 1 << 24

# config attributes of architectures that transform the logits after the head (Gemma 2/3 soft-capping, Cohere's
# logit scale, Granite's logits scaling): their head is not split (the identity would skip the transform)
_AFTER_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "lm_head"):
        model = model.module  # DistributedDataParallel
    return model


def output_head(model: nn.Module) -> Optional[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, head) of the model's output head, or None when it has none we can split."""
    inner = _unwrap(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return None
    cfg = getattr(inner, "config", None)
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _AFTER_HEAD):
        return None
    for name, module in model.named_modules():
        if module is head and name:
            parent, _, attr = name.rpartition(".")
            return model.get_submodule(parent) if parent else model, attr, head
    return None


@contextmanager
def head_split(model: nn.Module) -> Iterator[Optional[nn.Module]]:
    """Within the block, `model(...).logits` are the final hidden states; yields the output head (None: not split,
    `.logits` are the logits). The head is put back afterwards, also on an error."""
    found = output_head(model)
    if found is None:
        yield None
        return
    parent, attr, head = found
    setattr(parent, attr, nn.Identity())
    try:
        yield head
    finally:
        setattr(parent, attr, head)


def vocab_size(head: Optional[nn.Module], fallback: int = 1 << 18) -> int:
    """The head's output size (the vocabulary); `fallback` (large: chunk) when it cannot be read."""
    for m in (head, getattr(head, "base_layer", None), getattr(head, "original_module", None)):
        n = getattr(m, "out_features", None)
        if isinstance(n, int) and n > 0:
            return n
    w = getattr(head, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else fallback


def chunk_positions(vocab: int, rows: int = 1, budget: Optional[int] = None) -> int:
    """Positions per chunk so that `rows` x positions x `vocab` logits stay within the budget (at least 1)."""
    return max(1, (LOGITS_BUDGET if budget is None else budget) // max(1, vocab * rows))


def fits_at_once(positions: int, vocab: int) -> bool:
    """Whether `positions` x `vocab` logits are within one chunk's budget (then they are computed whole)."""
    return positions * vocab <= LOGITS_BUDGET


def _apply(head: Optional[nn.Module], fn: Callable, hidden: torch.Tensor, *aux: torch.Tensor) -> torch.Tensor:
    logits = hidden if head is None else head(hidden)
    return fn(logits.float(), *aux)


def map_tokens(hidden: torch.Tensor, head: Optional[nn.Module], fn: Callable[..., torch.Tensor], *aux: torch.Tensor,
               chunk: int, checkpoint: bool = False) -> torch.Tensor:
    """`fn(float32 logits [..., t, V], *aux[..., t, ...]) -> [..., t, ...]` over the positions of `hidden` [..., T, H]
    (dim -2; `aux` are cut along their dim `hidden.dim() - 2`), `chunk` positions at a time, concatenated back along
    that dim. `head` None: `hidden` holds the logits. `checkpoint`: recompute each chunk's logits in backward."""
    dim = hidden.dim() - 2
    n = hidden.shape[dim]
    record = checkpoint and torch.is_grad_enabled()
    outs = []
    for s in range(0, max(n, 1), chunk):
        h = hidden.narrow(dim, s, min(chunk, n - s))
        a = [x.narrow(dim, s, min(chunk, n - s)) for x in aux]
        if record:
            from torch.utils.checkpoint import checkpoint as ckpt

            outs.append(ckpt(_apply, head, fn, h, *a, use_reentrant=False))
        else:
            outs.append(_apply(head, fn, h, *a))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=dim)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position's target: logits [..., t, V], targets [..., t] -> [..., t] (-100: 0)."""
    flat = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             reduction="none")
    return flat.reshape(targets.shape)


def token_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) as gather minus logsumexp: logits [..., t, V], targets [..., t, K] -> [..., t, K]."""
    return logits.gather(-1, targets) - logits.logsumexp(-1, keepdim=True)
