"""Two task kinds that score texts by their negative log-likelihood.

- ``perplexity``: summed NLL per text over windows that overlap by one token; token perplexity of the corpus
  (the world's ``synth_ppl``, ``wikitext_lines``).
- ``loglikelihood_rolling``: lm-evaluation-harness 0.4.13's rolling log-likelihood (HFLM.loglikelihood_rolling)
  and its ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte`` (``wikitext``).
"""

from __future__ import annotations

import math
from typing import Optional

from ftlab.config.names import KIND_METRICS
from ftlab.eval.scoring import by_id
from ftlab.eval.task import Kind, Task, model_max_length, register_kind

__all__ = ["predict_perplexity", "score_perplexity", "predict_rolling", "score_rolling", "rolling_windows",
           "lm_eval_max_length"]


def predict_perplexity(model, tokenizer, task: Task, batch_size: int) -> list[dict]:
    """Summed NLL and token count of every text; every token after the first is predicted once.

    A text longer than the window (task.max_length or the model's) is cut into windows that overlap by one
    token: window j reads tokens [j(L-1), j(L-1)+L) and predicts all but its first. The logits are computed a chunk
    of positions at a time (ftlab.models.logits): never [batch x window x vocabulary] at once for a large vocabulary.
    """
    from ftlab.models.structure import pad_id

    L = model_max_length(model, task)
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
    windows = []  # (row index, window ids, first scored position, targets)
    for i, ids in enumerate(enc):
        for s in range(0, max(len(ids) - 1, 1), L - 1):
            w = ids[s:s + L]
            lo = max(first[i] - s, 1)  # position k of the window predicts token k + 1: from first[i] on
            windows.append((i, w, lo - 1, w[lo:]))
    nll = [0.0] * len(task.rows)
    for (i, *_), v in zip(windows, _window_nlls(model, pad_id(tokenizer), [w for _, *w in windows], batch_size)):
        nll[i] += v
    return [{"id": r["id"], "nll": v, "n_tokens": max(len(e) - f, 0)}
            for r, e, f, v in zip(task.rows, enc, first, nll)]


def _window_nlls(model, pad: int, windows: list[tuple[list[int], int, list[int]]], batch_size: int,
                 max_tokens: Optional[int] = None) -> list[float]:
    """Summed NLL of each window (ids, start, targets): position start + k of `ids` predicts targets[k].

    Windows run longest first, at most batch_size (and, with max_tokens, at most max_tokens padded tokens) at a time,
    padding at most MAX_PADDING of a batch (ftlab.utils.padding.length_batches).
    The logits are computed a chunk of positions at a time (ftlab.models.logits): never [batch x window x
    vocabulary] at once for a large vocabulary."""
    import torch

    from ftlab.models.logits import chunk_positions, head_split, map_tokens, vocab_size
    from ftlab.models.structure import eval_mode, model_device
    from ftlab.utils.padding import length_batches, right_pad

    device = model_device(model)
    batches = length_batches([len(w[0]) for w in windows], batch_size, max_tokens=max_tokens)
    out = [0.0] * len(windows)
    with eval_mode(model), torch.inference_mode():
        for batch in batches:
            chunk = [windows[j] for j in batch]
            ids, attn = right_pad([w for w, _, _ in chunk], pad)
            targets, mask = torch.zeros_like(ids), torch.zeros_like(ids)  # mask: positions whose NLL counts
            for b, (_, s, t) in enumerate(chunk):
                targets[b, s:s + len(t)] = torch.tensor(t, dtype=ids.dtype)
                mask[b, s:s + len(t)] = 1
            ids, targets, mask, attn = ids.to(device), targets.to(device), mask.to(device), attn.to(device)
            # the head applied a chunk of positions at a time (ftlab.models.logits); one chunk: the model's own ops
            with head_split(model) as head:
                hidden = model(input_ids=ids, attention_mask=attn).logits
            per = chunk_positions(vocab_size(head) if head is not None else hidden.shape[-1], rows=ids.shape[0])
            sums = (map_tokens(hidden, head, _nll, targets, chunk=per) * mask).sum(-1).tolist()
            for j, v in zip(batch, sums):
                out[j] = v
    return out


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


# ------------------------------------------------------------------------------------- loglikelihood_rolling
# lm-eval's HFLM.max_length when none is given (lm_eval.models.utils.resolve_max_length): the config's first of
# these, else the tokenizer's model_max_length unless unset (transformers' VERY_LARGE_INTEGER), else 2048.
_SEQLEN_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")
_TOKENIZER_INFINITY = 1000000000000000019884624838656


def lm_eval_max_length(model, tokenizer) -> int:
    """The window lm-eval's HF backend uses for this model: the model's full length, uncapped (ftlab's
    `model_max_length` caps at 4096 for multiple choice; a WikiText number depends on the window, so it must not)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in _SEQLEN_ATTRS:
        v = getattr(cfg, attr, None)
        if v is not None:
            return int(v)
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if n is not None and n != _TOKENIZER_INFINITY else 2048


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], int, list[int]]]:
    """lm-eval's windows (lm_eval.utils.get_rolling_token_windows with context_len=1, then make_disjoint_window,
    then HFLM._loglikelihood_tokens' input cut), as (model input, first scored position, targets).

    The first window reads the prefix token and then the text, and predicts its first max_len tokens; each next
    window predicts the next max_len tokens (fewer at the end) and reads the max_len tokens before its last target,
    so every token is predicted exactly once and the last window sees a full window of context."""
    out = []
    if not tokens:
        return out
    n = min(max_len, len(tokens))
    out.append(([prefix] + tokens[: n - 1], 0, tokens[:n]))
    done = n
    while done < len(tokens):
        k = min(len(tokens) - done, max_len)
        end = done + k
        # lm-eval: context tokens[end-max_len-1 : end-k], continuation tokens[end-k : end]; the model reads
        # (context + continuation)[-(max_len + 1):][:-1]
        inp = tokens[max(end - max_len - 1, 0): end][-(max_len + 1):][:-1]
        out.append((inp, len(inp) - k, tokens[end - k: end]))
        done = end
    return out


def _prefix_and_tokens(tokenizer, text: str) -> tuple[int, list[int]]:
    """lm-eval's prefix token (HFLM.prefix_token_id: BOS, else EOS) and its encoding of the text (HFLM.tok_encode
    with add_bos_token unset: the tokenizer's own special tokens, none when the text already starts with the
    prefix token's text). A tokenizer that adds BOS thus reads BOS twice and BOS is itself scored: lm-eval 0.4.13
    does this, and its numbers include that term."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise ValueError("eval: a loglikelihood_rolling task (wikitext) conditions its first token on the tokenizer's "
                         "BOS (else EOS) token, as lm-eval does; this tokenizer has neither: set tokenizer.bos_token")
    special = not text.startswith(tokenizer.decode(prefix))
    return prefix, tokenizer(text, add_special_tokens=special)["input_ids"]


def predict_rolling(model, tokenizer, task: Task, batch_size: int) -> list[dict]:
    """Summed NLL of every text over lm-eval's rolling windows (`rolling_windows`) of task.max_length tokens, else
    lm-eval's window for the model (`lm_eval_max_length`); n_tokens = tokens scored (the text's encoding).

    Windows run at most batch_size x 4096 padded tokens at a time: a model with a 128k window reads a page in one
    window, as lm-eval does, without batch_size of them at once."""
    from ftlab.models.structure import pad_id

    L = task.max_length or lm_eval_max_length(model, tokenizer)
    windows, counts = [], []
    for i, r in enumerate(task.rows):
        prefix, tokens = _prefix_and_tokens(tokenizer, r["text"])
        counts.append(len(tokens))
        windows += [(i, w) for w in rolling_windows(tokens, prefix, L)]
    nll = [0.0] * len(task.rows)
    sums = _window_nlls(model, pad_id(tokenizer), [w for _, w in windows], batch_size, max_tokens=batch_size * 4096)
    for (i, _), v in zip(windows, sums):
        nll[i] += v
    return [{"id": r["id"], "nll": v, "n_tokens": c} for r, v, c in zip(task.rows, nll, counts)]


def score_rolling(task: Task, predictions: list[dict]) -> tuple[dict, list[dict]]:
    """lm-eval's aggregations over the items' summed NLL (weighted_perplexity, bits_per_byte):
    word_perplexity = exp(sum NLL / sum words), byte_perplexity = exp(sum NLL / sum bytes),
    bits_per_byte = sum NLL / sum bytes / ln 2; words and bytes are counts of the original text (the row's)."""
    preds = by_id(task, predictions, "nll")
    items = []
    for r in task.rows:
        p = preds[r["id"]]
        item = {"id": r["id"], "nll": float(p["nll"]), "n_words": int(r["n_words"]), "n_bytes": int(r["n_bytes"])}
        if "n_tokens" in p:
            item["n_tokens"] = int(p["n_tokens"])
        items.append(item)
    total = sum(i["nll"] for i in items)
    words, nbytes = sum(i["n_words"] for i in items), sum(i["n_bytes"] for i in items)
    nan = float("nan")
    return {"word_perplexity": math.exp(total / words) if words else nan,
            "byte_perplexity": math.exp(total / nbytes) if nbytes else nan,
            "bits_per_byte": total / nbytes / math.log(2) if nbytes else nan}, items


register_kind(Kind("loglikelihood_rolling", KIND_METRICS["loglikelihood_rolling"], predict_rolling, score_rolling))
