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

from ftlab.kernels.fused_ce import fused_linear_cross_entropy
from ftlab.train.batches import IGNORE


def fusable(head: Optional[nn.Module]) -> bool:
    """Whether `head` is a plain linear layer the fused loss can take the weight of."""
    if type(head) is not nn.Linear:
        return False
    w = head.weight
    return type(w) in (torch.Tensor, nn.Parameter)  # a DTensor (FSDP2) holds one shard only


def fused_response_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens (labels != -100), as `response_loss`; hidden [B, T, H]
    are the final hidden states (head split off). 0, with zero gradients, when there are none."""
    target = labels[:, 1:]
    mask = target != IGNORE
    rows, tgt = hidden[:, :-1][mask], target[mask]
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # the head's matmul in the autocast dtype, as the model's own head would
        rows = rows.to(torch.get_autocast_dtype(device))
    with torch.autocast(device, enabled=False):
        return fused_linear_cross_entropy(rows, head.weight, tgt, bias=head.bias, normalizer=max(int(tgt.numel()), 1))
