"""Padding token-id lists into one batch tensor, one copy for every caller (evaluation, generation, probes,
diagnostics, the tiny world's pretraining batches)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["pad_batch", "left_pad", "right_pad"]


def pad_batch(seqs: Sequence[Sequence[int]], value: int, *, left: bool = False) -> torch.Tensor:
    """A [len(seqs), longest] long tensor: each sequence followed (or, left=True, preceded) by `value`. One
    tensor() call on padded lists: ~4x faster than filling the rows of a preallocated tensor."""
    width = max(len(s) for s in seqs)
    if left:
        return torch.tensor([[value] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def right_pad(seqs: Sequence[Sequence[int]], pad: int,
              device: Optional[torch.device | str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of a right-padded batch (real tokens first), on `device` (None: the CPU)."""
    ids, mask = pad_batch(seqs, pad), pad_batch([[1] * len(s) for s in seqs], 0)
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def left_pad(seqs: Sequence[Sequence[int]], pad: int,
             device: Optional[torch.device | str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of a left-padded batch (every row ends in the last column), on `device`."""
    ids, mask = pad_batch(seqs, pad, left=True), pad_batch([[1] * len(s) for s in seqs], 0, left=True)
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))
