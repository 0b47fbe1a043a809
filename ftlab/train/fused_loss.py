"""hw.kernels=true: the training loss from the final hidden states and the output head through
ftlab.kernels.fused_ce, so the [response tokens x vocabulary] logits are never held, not even one chunk's float32 copy
per position of the sequence.

Used only where it computes the same function as `response_loss`: a plain `nn.Linear` head (tied or not) whose
weight is an ordinary tensor. A head that peft wraps (LoRA on lm_head, modules_to_save), an FSDP-sharded head or a
model that transforms the logits after the head (head_split yields None then) goes through `response_loss`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ftlab.kernels.fused_ce import fused_linear_cross_entropy, fused_linear_kl
from ftlab.train.batches import IGNORE


def fusable(head: Optional[nn.Module], kl: bool = False) -> bool:
    """Whether `head` is a plain linear layer the fused loss can take the weight of."""
    if type(head) is not nn.Linear:
        return False
    if kl and head.bias is not None:  # fused_linear_kl takes no bias
        return False
    w = head.weight
    return type(w) in (torch.Tensor, nn.Parameter)  # a DTensor (FSDP2) holds one shard only


def _rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = x[:, :-1][mask]
    device = x.device.type
    if torch.is_autocast_enabled(device):  # the head's matmul in the autocast dtype, as the model's own head would
        rows = rows.to(torch.get_autocast_dtype(device))
    return rows


def fused_response_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens (labels != -100), as `response_loss`; hidden [B, T, H]
    are the final hidden states (head split off). 0, with zero gradients, when there are none."""
    target = labels[:, 1:]
    mask = target != IGNORE
    rows, tgt = _rows(hidden, mask), target[mask]
    with torch.autocast(hidden.device.type, enabled=False):
        return fused_linear_cross_entropy(rows, head.weight, tgt, bias=head.bias, normalizer=max(int(tgt.numel()), 1))


def fused_token_kl(hidden: torch.Tensor, ref_hidden: torch.Tensor, labels: torch.Tensor, head: nn.Linear,
                   ref_head: nn.Linear) -> torch.Tensor:
    """reg=kl's term as ftlab.train.regularisers.token_kl: the mean over response positions of
    KL(model || reference), from both final hidden states and bias-free linear heads; 0 with zero gradients when
    there are no response positions."""
    mask = labels[:, 1:] != IGNORE
    rows, ref_rows = _rows(hidden, mask), _rows(ref_hidden.detach(), mask)
    with torch.autocast(hidden.device.type, enabled=False):
        return fused_linear_kl(rows, head.weight, ref_rows, ref_head.weight.detach(), normalizer=max(rows.shape[0], 1))
