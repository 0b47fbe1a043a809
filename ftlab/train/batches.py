"""Training rows as tensors: encoding (prompt masked in the labels), seeded batches, padding, the response-only
loss. Public: methods use them for calibration; the loop uses them for training.
"""

from __future__ import annotations

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


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens (labels != -100)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                             ignore_index=IGNORE)
