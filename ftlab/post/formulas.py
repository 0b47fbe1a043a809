"""The merging formulas on single tensors (one parameter at a time, so merging streams tensor by tensor).

Each takes the task vectors tau_i = theta_i - theta_base of one parameter (a list of same-shape float tensors) and
returns the merged delta; the caller adds it to the base. Sources of each rule are in ftlab.config.post and
docs/post.md. Two deliberate differences from the official TIES code, both from streaming: the top-k trim and the
resolution of a zero elected sign are per tensor here, where the official code flattens the whole model into one
vector (mergekit and peft also trim per tensor).
"""

from __future__ import annotations

import zlib
from typing import Callable, Optional, Sequence

import torch


def soup(tuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """Uniform soup (Wortsman et al. 2022): the mean of the fine-tuned weights themselves (not base + mean delta), so a
    soup of one model is that model bit for bit."""
    if len(tuned) == 1:
        return tuned[0].clone()
    out = tuned[0].float().clone()
    for t in tuned[1:]:
        out += t.float()
    return out / len(tuned)


def task_arithmetic(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): the sum of the task vectors (the caller scales it by lambda)."""
    out = deltas[0].float().clone()
    for d in deltas[1:]:
        out += d.float()
    return out


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep the entries whose magnitude is at least the k-th largest, k = max(1, int(n * density));
    entries tied with that magnitude are all kept (as the official topk_values_mask's `>=`). The official code takes
    the (n - k)-th smallest as its threshold, which keeps k + 1 entries; here exactly k (plus ties). density >= 1
    keeps everything."""
    if density >= 1:
        return delta.clone()
    flat = delta.reshape(-1)
    n = flat.numel()
    keep = max(1, int(n * density))
    kth = flat.abs().kthvalue(n - keep + 1).values
    return delta * (delta.abs() >= kth)


def elect_sign(trimmed: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES step 2 on the stacked trimmed deltas [k, ...]: total = sign of their sum (the official `mass`), frequency =
    sign of the sum of their signs; an entry whose elected sign is 0 takes the majority sign of the whole tensor's
    elected signs (the official resolve_zero_signs, per tensor here)."""
    if method == "total":
        sign = torch.sign(trimmed.sum(dim=0))
    elif method == "frequency":
        sign = torch.sign(torch.sign(trimmed).sum(dim=0))
    else:
        raise ValueError(f"sign: unknown sign election {method!r}; valid: total, frequency")
    majority = torch.sign(sign.sum())
    return torch.where(sign == 0, majority, sign)


def ties(deltas: Sequence[torch.Tensor], density: float = 0.2, sign: str = "total") -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023): trim each task vector to its top `density`, elect a sign per entry, average
    the entries that agree with it (dis-mean: zeros and disagreeing entries do not count; none agree: 0)."""
    stacked = torch.stack([trim(d.float(), density) for d in deltas])
    elected = elect_sign(stacked, sign)
    agree = torch.where(elected > 0, stacked > 0, stacked < 0)
    kept = stacked * agree
    count = agree.sum(dim=0).clamp(min=1)
    return kept.sum(dim=0) / count


def tensor_generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU generator seeded from `seed` and the keys (the run index, the parameter name): the same draw for the same
    parameter whatever order tensors are streamed in."""
    text = "\0".join(str(k) for k in (seed, *keys)).encode()
    return torch.Generator().manual_seed(zlib.crc32(text))


def dare(delta: torch.Tensor, drop: float, rescale: bool = True,
         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability `drop`, divide what is kept by 1 - drop (rescale), so
    E[dare(delta)] = delta."""
    if drop == 0:
        return delta.float().clone()
    keep = torch.rand(delta.shape, generator=generator) >= drop
    out = delta.float() * keep
    return out / (1 - drop) if rescale else out


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023) as mergekit's magnitude_outliers: of n entries, the
    int(gamma * n) largest magnitudes (outliers) and the smallest ones are masked so that int(density * n) remain;
    ties in magnitude are broken by position (a stable sort), so the mask is exact and reproducible."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:  # fewer outliers removed to reach the density (mergekit's rule)
        n_top += n_bot
        n_bot = 0
    order = torch.sort(delta.abs().reshape(-1).float(), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_bot:n - n_top]] = True
    return mask.reshape(delta.shape)


def breadcrumbs(deltas: Sequence[torch.Tensor], density: float = 0.9, gamma: float = 0.01) -> torch.Tensor:
    """Each task vector masked by `breadcrumbs_mask`, then summed (the caller scales by lambda)."""
    return task_arithmetic([d.float() * breadcrumbs_mask(d, density, gamma) for d in deltas])


def lines_factor(block: Optional[int], n_blocks: int, alpha: float, beta: float) -> float:
    """LiNeS: block `block` (0-based) of `n_blocks` keeps alpha + beta * block / (n_blocks - 1) of its update; a
    parameter outside the blocks (block None: embeddings, final norm, head) keeps alpha, as the official code does.
    One block: alpha + beta (it is the deepest)."""
    if block is None:
        return alpha
    if n_blocks <= 1:
        return alpha + beta
    return alpha + beta * block / (n_blocks - 1)


def greedy_soup_order(scores: Sequence[float], evaluate: Callable[[list[int]], float]) -> dict:
    """Greedy soup (Wortsman et al. 2022, Algorithm 1): ingredients sorted by their own held-out score (best first;
    equal scores keep input order), each added when the soup with it scores at least as well as without it.
    `evaluate(indices)` scores the uniform soup of those ingredients. Returns {order, chosen, steps}."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    chosen = [order[0]]
    best = evaluate(chosen)
    steps = [{"try": order[0], "score": best, "kept": True}]
    for i in order[1:]:
        s = evaluate(chosen + [i])
        kept = s >= best
        steps.append({"try": i, "score": s, "kept": kept})
        if kept:
            chosen, best = chosen + [i], s
    return {"order": order, "chosen": chosen, "steps": steps, "score": best}
