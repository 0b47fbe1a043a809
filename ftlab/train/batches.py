"""Training rows as tensors: encoding (prompt masked in the labels), seeded batches, padding, the response-only
loss. Public: methods use them for calibration; the loop uses them for training.
"""

from __future__ import annotations

from typing import Optional

import torch

from ftlab.utils.padding import pad_batch

IGNORE = -100


def encode_example(tokenizer, prompt: str, response: str, max_length: Optional[int],
                   fmt: Optional[str] = None) -> dict:
    """One training row: input_ids, and labels that mask everything but the answer (IGNORE), so the loss is on
    the answer only.

    plain: the prompt (with the tokenizer's specials, as at generation time) + the response + eos.
    chat: the tokenizer's chat template (ftlab.eval.prompts.chat_texts): the prompt as the user turn with the
      generation prompt, token for token what evaluation feeds the model, then the response, stripped, as the
      assistant turn. Labels cover the assistant's text and its end-of-turn token (the turn's last special token;
      eos appended when the template writes none), not what the template writes after it (a newline).
    A row with an empty prompt (general text mixed in by data.mix) is plain in every format.

    fmt None: the format the tokenizer was loaded for (``tokenizer.ftlab_info["prompt_format"]``, set by
    ftlab.models.loading.load_tokenizer; plain without it). max_length None: the row uncut (`truncation` measures
    what cutting loses); else its first max_length tokens."""
    if fmt is None:
        fmt = (getattr(tokenizer, "ftlab_info", None) or {}).get("prompt_format", "plain")
    if fmt == "chat" and prompt:
        from ftlab.eval.prompts import chat_texts

        p_text, full = chat_texts(tokenizer, prompt, response)
        p = tokenizer(p_text, add_special_tokens=True)["input_ids"]
        ids = tokenizer(full, add_special_tokens=True)["input_ids"]
        if ids[:len(p)] != p:  # a token across the boundary: the parts apart, the prompt as evaluation reads it
            ids = p + tokenizer(full[len(p_text):], add_special_tokens=False)["input_ids"]
        r = ids[len(p):]
        special = set(tokenizer.all_special_ids)
        end = max((i for i, t in enumerate(r) if t in special), default=None)
        if end is None and tokenizer.eos_token_id is not None:
            r, end = r + [tokenizer.eos_token_id], len(r)
        answer = len(r) if end is None else end + 1
        ids, labels = p + r, [IGNORE] * len(p) + r[:answer] + [IGNORE] * (len(r) - answer)
    else:
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            r = r + [tokenizer.eos_token_id]
        ids, labels = p + r, [IGNORE] * len(p) + r
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def truncation(rows: list[dict], max_length: int) -> dict:
    """What cutting uncut encoded rows (`encode_example(..., max_length=None)`) to `max_length` tokens loses.

    Answer tokens are the trained ones (labels != IGNORE after the first position, as `response_tokens` counts
    them). `rows_cut`: rows longer than max_length; `answer_tokens_lost`: answer tokens past it;
    `rows_answer_lost`: rows that keep none of their answer (they would train on nothing); `eos_lost`: rows whose
    last answer token (eos, or the chat template's end of turn) is cut, so they never show where an answer ends."""
    cut = lost = whole = end = answer = longest = 0
    for r in rows:
        n = len(r["input_ids"])
        longest = max(longest, n)
        pos = [i for i, x in enumerate(r["labels"]) if i > 0 and x != IGNORE]
        answer += len(pos)
        if n <= max_length:
            continue
        cut += 1
        gone = sum(1 for i in pos if i >= max_length)
        lost += gone
        whole += bool(pos) and gone == len(pos)
        end += bool(pos) and pos[-1] >= max_length
    return {"max_length": max_length, "rows": len(rows), "longest": longest, "rows_cut": cut,
            "answer_tokens": answer, "answer_tokens_lost": lost,
            "answer_tokens_lost_pct": round(100.0 * lost / answer, 2) if answer else 0.0,
            "rows_answer_lost": whole, "eos_lost": end}


def encode_rows(tokenizer, rows: list[dict], max_length: Optional[int], context: Optional[int] = None,
                fmt: Optional[str] = None) -> tuple[list[dict], dict]:
    """The training rows encoded (`encode_example`) and cut at the run's max length, and what was decided and lost:
    {prompt_format, max_length, max_length_from, model_context, truncation (`truncation`)}.

    max_length None: the longest encoded task row (general rows of data.mix, ids ``mix:``, aside: a long text would
    set it), capped by the model's `context`."""
    fmt = fmt or (getattr(tokenizer, "ftlab_info", None) or {}).get("prompt_format", "plain")
    full = [encode_example(tokenizer, x["prompt"], x["response"], None, fmt) for x in rows]
    source = "model.max_length"
    if max_length is None:
        task = [len(e["input_ids"]) for e, x in zip(full, rows) if not str(x.get("id", "")).startswith("mix:")]
        max_length = max(task or [len(e["input_ids"]) for e in full] or [1])
        source = "longest training row"
        if context is not None and max_length > context:
            max_length, source = context, "model context"
    stats = truncation(full, max_length)
    encoded = [{"input_ids": e["input_ids"][:max_length], "labels": e["labels"][:max_length]} for e in full]
    return encoded, {"prompt_format": fmt, "max_length": max_length, "max_length_from": source,
                     "model_context": context, "truncation": stats}


def truncation_problem(info: dict, allow: bool) -> tuple[bool, Optional[str]]:
    """(refuse, message) for `encode_rows`'s info: refuse when a row loses its whole answer (unless `allow`); a
    message whenever a row is cut, with the numbers and the knob to change."""
    t, n = info["truncation"], info["max_length"]
    if not t["rows_cut"]:
        return False, None
    numbers = (f"{t['rows_cut']} of {t['rows']} training rows are cut at model.max_length={n} "
               f"({info['max_length_from']}): {t['answer_tokens_lost']} of {t['answer_tokens']} answer tokens lost "
               f"({t['answer_tokens_lost_pct']}%), {t['rows_answer_lost']} rows lose their whole answer, "
               f"{t['eos_lost']} lose their EOS; the longest row is {t['longest']} tokens")
    ctx = info.get("model_context")
    if info["max_length_from"] == "model context":
        knob = (f"the model's context is {ctx} tokens, so such rows cannot be trained whole: shorten or drop them "
                "(data.n_train, another data.path)")
    else:
        knob = (f"raise model.max_length (model.max_length={min(t['longest'], ctx) if ctx else t['longest']}, or "
                "model.max_length=null: the longest row, capped by the model's context)")
    if t["rows_answer_lost"] and not allow:
        return True, (f"data: {numbers}. Rows without any answer token train on nothing; {knob}, or set "
                      "data.allow_truncation=true to train anyway")
    return False, f"data: {numbers}; {knob}"


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-padded [rows, longest] input_ids, labels (IGNORE past each row) and attention mask."""
    return {"input_ids": pad_batch([r["input_ids"] for r in rows], pad_id),
            "labels": pad_batch([r["labels"] for r in rows], IGNORE),
            "attention_mask": pad_batch([[1] * len(r["input_ids"]) for r in rows], 0)}


def pack(rows: list[dict], capacity: int, pad_id: int) -> dict:
    """data.packing: `rows` concatenated into as few sequences of at most `capacity` tokens as first-fit decreasing
    finds (a row longer than capacity gets a sequence of its own), right-padded to the longest sequence.

    Returns input_ids, labels and position_ids, no attention mask: position ids restart at 0 on each row, and
    transformers (masking_utils.find_packed_sequence_indices) reads a restart as a new sequence that attends only
    within itself (eager, sdpa and flash attention alike), so no row sees another. Each row's first label is IGNORE:
    the loss shifts labels by one, so in a packed sequence it would be predicted from the previous row's last token;
    the plain path never counts it either (`response_tokens`), so the same tokens enter the loss. The padding tail is
    a sequence of its own (its positions restart too) with IGNORE labels."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(rows)), key=lambda j: -len(rows[j]["input_ids"])):
        n = len(rows[i]["input_ids"])
        k = next((b for b, r in enumerate(room) if r >= n), None)
        if k is None:
            bins.append([i])
            room.append(capacity - n)
        else:
            bins[k].append(i)
            room[k] -= n
    ids, labels, pos = [], [], []
    for b in bins:
        ids.append([t for i in b for t in rows[i]["input_ids"]])
        labels.append([x for i in b for x in [IGNORE] + list(rows[i]["labels"][1:])])
        pos.append([p for i in b for p in range(len(rows[i]["input_ids"]))])
    width = max(len(x) for x in ids)
    pos = [p + list(range(width - len(p))) for p in pos]
    return {"input_ids": pad_batch(ids, pad_id), "labels": pad_batch(labels, IGNORE),
            "position_ids": torch.tensor(pos, dtype=torch.long)}


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
