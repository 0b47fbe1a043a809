"""Training rows as tensors: encoding (prompt masked in the labels), seeded batches, padding, the response-only
loss. Public: methods use them for calibration; the loop uses them for training.
"""

from __future__ import annotations

from typing import Optional

import torch

from ftlab.utils.padding import pad_batch

IGNORE = -100


def encode_example(tokenizer, prompt: str, response: str, max_length: int) -> dict:
    """input_ids = prompt (with the tokenizer's specials, as at generation time) + response + eos;
    labels mask the prompt, so the loss is on the response tokens only."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    ids = (p + r)[:max_length]
    labels = ([IGNORE] * len(p) + r)[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-padded [rows, longest] input_ids, labels (IGNORE past each row) and attention mask."""
    return {"input_ids": pad_batch([r["input_ids"] for r in rows], pad_id),
            "labels": pad_batch([r["labels"] for r in rows], IGNORE),
            "attention_mask": pad_batch([[1] * len(r["input_ids"]) for r in rows], 0)}


class Batches:
    """Seeded epochs of shuffled examples; `position` (epoch, index) is all a resume needs."""

    def __init__(self, encoded: list[dict], batch_size: int, seed: int):
        if not encoded:
            raise ValueError("data: no training examples")
        self.encoded, self.batch_size, self.seed = encoded, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.encoded), generator=g).tolist()

    def next(self) -> list[dict]:
        out = []
        while len(out) < self.batch_size:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
            out.append(self.encoded[self._order[self.index]])
            self.index += 1
        return out

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_position(self, epoch: int, index: int) -> None:
        """Continue from `position` (the epoch's order is re-derived from seed + epoch)."""
        self.epoch, self.index = int(epoch), int(index)
        self._order = self._perm(self.epoch)


def response_tokens(rows: list[dict]) -> int:
    """Tokens the loss is taken on (labels != -100 after the shift by one), over encoded rows."""
    return sum(sum(1 for x in r["labels"][1:] if x != IGNORE) for r in rows)


def micro_batches(rows: list[dict], size: int | None) -> list[list[dict]]:
    """hw.micro_batch_size rows per forward (all at once when None)."""
    if not size or size >= len(rows):
        return [rows]
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def response_loss(logits: torch.Tensor, labels: torch.Tensor, head: Optional[torch.nn.Module] = None,
                  chunk: Optional[int] = None) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens (labels != -100); 0 when there are none (a micro-batch
    of prompt-only rows: zero loss, zero gradient, still connected to the graph so every rank's backward runs).

    `head` (from ftlab.models.logits.head_split): `logits` are the final hidden states and the head is applied here.
    While the whole [positions x vocabulary] logits fit `chunk` positions (default: ftlab.models.logits.LOGITS_BUDGET
    elements), they are computed at once and the loss is the plain mean, bit for bit as without a head; above it, the
    response positions alone go through the head `chunk` at a time, each chunk's logits recomputed in backward
    (torch.utils.checkpoint), and the loss is the sum of the chunks' sums over the count (summation order only)."""
    from ftlab.models.logits import chunk_positions, map_tokens, token_nll, vocab_size

    target = labels[:, 1:]
    if chunk is None:
        chunk = chunk_positions(vocab_size(head) if head is not None else logits.shape[-1])
    if head is None or target.numel() <= chunk:
        if head is not None:
            logits = head(logits)
        logits = logits[:, :-1].float()
        flat, tgt = logits.reshape(-1, logits.size(-1)), target.reshape(-1)
        if not bool((tgt != IGNORE).any()):  # the mean would be 0/0
            return torch.nn.functional.cross_entropy(flat, tgt, ignore_index=IGNORE, reduction="sum")
        return torch.nn.functional.cross_entropy(flat, tgt, ignore_index=IGNORE)
    mask = target != IGNORE
    rows, tgt = logits[:, :-1][mask], target[mask]  # [N, H] hidden states of the response positions, their targets
    nll = map_tokens(rows, head, token_nll, tgt, chunk=chunk, checkpoint=True)
    return nll.sum() / nll.numel() if nll.numel() else nll.sum()
