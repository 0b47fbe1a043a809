"""How close each fine-tuning target is to each pretraining skill, measured at the base model.

The measure is the cosine similarity between the mean loss gradient of a target's training examples and that of a
skill's, over every parameter of the base model: the standard first-order interference measure (a gradient step on
the target changes a skill's loss by -lr * g_target . g_skill, so a large positive cosine means a step that helps
the target also moves the skill, and is where forgetting is expected first). The structural table it backs is
`ftlab.world.skills.NEIGHBOURS`; scripts/world_distances.py prints both for the default world.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ftlab.utils.padding import pad_batch
from ftlab.world import skills as sk

__all__ = ["mean_gradient", "gradient_similarity", "skill_similarity"]


def _encode(tokenizer, examples: Sequence[Mapping]) -> tuple[torch.Tensor, torch.Tensor]:
    # The pretraining objective exactly (ftlab.world.pretrain._Batcher): loss on the response and </s> only.
    v = tokenizer.get_vocab()
    rows, tgts = [], []
    for e in examples:
        p = [tokenizer.bos_token_id] + [v[c] for c in e["prompt"]]
        r = [v[c] for c in e["response"]] + [tokenizer.eos_token_id]
        rows.append(p + r[:-1])
        tgts.append([-100] * (len(p) - 1) + r)
    return pad_batch(rows, tokenizer.pad_token_id), pad_batch(tgts, -100)


def mean_gradient(model, tokenizer, examples: Sequence[Mapping], batch_size: int = 128) -> torch.Tensor:
    """The gradient of the mean per-token response loss over `examples`, flattened over every parameter (fp32).

    Batches are weighted by their token counts, so the result does not depend on `batch_size`. The model's
    gradients are left as they were found (None)."""
    if not examples:
        raise ValueError("mean_gradient: no examples")
    params = [p for p in model.parameters()]
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    n_tok = 0
    was_training = model.training
    model.eval()  # no dropout: the gradient of the base model as it scores
    try:
        for i in range(0, len(examples), batch_size):
            x, y = _encode(tokenizer, examples[i:i + batch_size])
            x, y = x.to(params[0].device), y.to(params[0].device)
            logits = model(input_ids=x, attention_mask=(x != tokenizer.pad_token_id).long()).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                                     reduction="sum")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t += g.float()
            n_tok += int((y != -100).sum())
    finally:
        model.train(was_training)
    return torch.cat([t.flatten() for t in total]) / n_tok


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def gradient_similarity(model, tokenizer, groups: Mapping[str, Sequence[Mapping]],
                        batch_size: int = 128) -> dict[str, dict[str, float]]:
    """Cosine similarity of the mean loss gradients of every pair of example groups: {a: {b: cos}} (symmetric,
    1 on the diagonal). `groups` maps a name to examples with ``prompt`` and ``response``."""
    grads = {name: mean_gradient(model, tokenizer, exs, batch_size) for name, exs in groups.items()}
    return {a: {b: _cos(ga, gb) for b, gb in grads.items()} for a, ga in grads.items()}


def skill_similarity(model, tokenizer, targets: Sequence[str], skills: Sequence[str], n: int = 256,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """{target: {skill: cosine}} between each target's and each pretraining skill's mean training-split gradient,
    `n` examples each (the same examples for a given seed)."""
    names = list(dict.fromkeys(list(targets) + list(skills)))
    sim = gradient_similarity(model, tokenizer, {s: sk.make_examples(s, "train", n, seed=seed) for s in names})
    return {t: {s: sim[t][s] for s in skills} for t in targets}
