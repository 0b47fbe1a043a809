"""The ``perplexity`` task kind: summed NLL per text over overlapping windows; corpus perplexity."""

from __future__ import annotations

import math

from ftlab.config.names import KIND_METRICS
from ftlab.eval.scoring import by_id
from ftlab.eval.task import Kind, Task, model_max_length, register_kind

__all__ = ["predict_perplexity", "score_perplexity"]


def predict_perplexity(model, tokenizer, task: Task, batch_size: int) -> list[dict]:
    """Summed NLL and token count of every text; every token after the first is predicted once.

    A text longer than the window (task.max_length or the model's) is cut into windows that overlap by one
    token: window j reads tokens [j(L-1), j(L-1)+L) and predicts all but its first. The logits are computed a chunk
    of positions at a time (ftlab.models.logits): never [batch x window x vocabulary] at once for a large vocabulary.
    """
    import torch

    from ftlab.models.logits import chunk_positions, head_split, map_tokens, vocab_size
    from ftlab.models.structure import eval_mode, model_device, pad_id
    from ftlab.utils.padding import right_pad

    device, pad, L = model_device(model), pad_id(tokenizer), model_max_length(model, task)
    # A row with a "context" is scored on its "text" only (conditional perplexity: the synthetic world's
    # base model was trained on answers, never on prompts); first[i] is the first token that counts.
    enc, first = [], []
    for r in task.rows:
        if "context" in r:
            c = tokenizer(r["context"], add_special_tokens=True)["input_ids"]
            t = tokenizer(r["text"], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                t = t + [tokenizer.eos_token_id]
            enc.append(c + t)
            first.append(len(c))
        else:
            enc.append(tokenizer(r["text"], add_special_tokens=True)["input_ids"])
            first.append(1)
    windows = []  # (row index, offset, token ids)
    for i, ids in enumerate(enc):
        for s in range(0, max(len(ids) - 1, 1), L - 1):
            windows.append((i, s, ids[s:s + L]))
    nll = [0.0] * len(task.rows)
    order = sorted(range(len(windows)), key=lambda j: -len(windows[j][2]))
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = [windows[j] for j in order[start:start + batch_size]]
            ids, attn = right_pad([w for _, _, w in chunk], pad)
            mask = torch.zeros_like(ids)  # tokens whose NLL counts
            for b, (i, s, w) in enumerate(chunk):
                # position k of the window predicts token s + k + 1 of the row: counted from first[i] on
                lo = max(first[i] - s, 1)
                mask[b, lo:len(w)] = 1
            ids, mask, attn = ids.to(device), mask.to(device), attn.to(device)
            # the head applied a chunk of positions at a time (ftlab.models.logits); one chunk: the model's own ops
            with head_split(model) as head:
                hidden = model(input_ids=ids, attention_mask=attn).logits
            per = chunk_positions(vocab_size(head) if head is not None else hidden.shape[-1], rows=ids.shape[0])
            targets = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)  # the last position predicts none
            tok_nll = map_tokens(hidden, head, _nll, targets, chunk=per)[:, :-1]
            sums = (tok_nll * mask[:, 1:]).sum(-1).tolist()
            for (i, _, _), v in zip(chunk, sums):
                nll[i] += v
    return [{"id": r["id"], "nll": v, "n_tokens": max(len(e) - f, 0)}
            for r, e, f, v in zip(task.rows, enc, first, nll)]


def _nll(logits, targets):
    """Per-position NLL of a chunk: logits [B, t, V] (float32), targets [B, t]."""
    import torch

    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


def score_perplexity(task: Task, predictions: list[dict]) -> tuple[dict, list[dict]]:
    """Corpus perplexity exp(sum NLL / sum tokens) and the mean NLL per token."""
    preds = by_id(task, predictions, "nll")
    items = []
    for r in task.rows:
        p = preds[r["id"]]
        if "n_tokens" not in p:
            raise ValueError(f"predictions for {task.name!r}: item {r['id']!r} has 'nll' but no 'n_tokens'")
        items.append({"id": r["id"], "nll": float(p["nll"]), "n_tokens": int(p["n_tokens"])})
    total, count = sum(i["nll"] for i in items), sum(i["n_tokens"] for i in items)
    return {"perplexity": math.exp(total / count) if count else float("nan"),
            "nll_per_token": total / count if count else float("nan")}, items


register_kind(Kind("perplexity", KIND_METRICS["perplexity"], predict_perplexity, score_perplexity))
