"""The ``multiple_choice`` task kind: the log-likelihood of each continuation after its context; acc and acc_norm.

A context's choices share one pass over the context (its KV cache, passed with transformers' `cache=` keyword), packed
into one row where they are short; see `mc_loglikelihoods`. The continuations' log-likelihoods apply the output head a
chunk of positions at a time (ftlab.models.logits): a large vocabulary's [rows x positions x vocabulary] logits are
never held at once.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Optional

from ftlab.config.names import KIND_METRICS
from ftlab.eval.prompts import apply_format
from ftlab.eval.scoring import by_id, mean
from ftlab.eval.task import Kind, Task, model_max_length, register_kind

__all__ = ["predict_multiple_choice", "score_multiple_choice", "mc_requests", "encode_pairs", "mc_loglikelihoods",
           "mc_choice_lengths"]


def _base_forward(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.forward


def _supports_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(_base_forward(model)).parameters
    except (TypeError, ValueError):
        return False


def _is_prompt_learning(model) -> bool:
    cfg = getattr(model, "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False))



def mc_requests(task: Task, tokenizer=None) -> list[list[tuple[str, str]]]:
    """Per row, the (context, continuation) text pairs whose log-likelihoods are compared."""
    out = []
    for r in task.rows:
        fmt = (lambda c: apply_format(tokenizer, c, task.format)) if task.format != "plain" else (lambda c: c)
        if "contexts" in r:
            out.append([(fmt(c), task.delimiter + r["continuation"]) for c in r["contexts"]])
        else:
            ctx = fmt(r["context"])
            out.append([(ctx, task.delimiter + c) for c in r["choices"]])
    return out


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """lm-evaluation-harness's pair encoding: trailing spaces of the context move to the continuation; the
    continuation's tokens are those of tok(context + continuation) after the first len(tok(context))."""
    from ftlab.models.structure import pad_id

    ctxs, wholes = [], []
    for ctx, cont in pairs:
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        ctxs.append(ctx)
        wholes.append(ctx + cont)
    uniq = list(dict.fromkeys(ctxs))
    enc_ctx = dict(zip(uniq, tokenizer(uniq, add_special_tokens=True)["input_ids"]))
    enc_whole = tokenizer(wholes, add_special_tokens=True)["input_ids"]
    out = []
    for ctx, whole in zip(ctxs, enc_whole):
        c = list(enc_ctx[ctx])
        if not c:  # a tokenizer without BOS and an empty context: condition on eos
            c = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad_id(tokenizer)]
            out.append((c, list(whole)))
        else:
            out.append((c, list(whole[len(c):])))
    return out


def _select_cache(cache, idx):
    """A new cache holding rows `idx` (repeats allowed) of `cache`; `cache` itself is left as it is."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in new.layers:
        layer.batch_select_indices(idx)
    return new


def _can_share(model, cache) -> bool:
    try:
        from transformers.cache_utils import DynamicCache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(cache, DynamicCache) and all(hasattr(layer, "keys") for layer in getattr(cache, "layers", [None]))


def mc_loglikelihoods(model, tokenizer, requests: list[tuple[list[int], list[int]]], batch_size: int,
                      max_length: int, share_context: Optional[bool] = None) -> list[float]:
    """log p(continuation | context) for token-id pairs, batched.

    share_context (default: when the model allows it): requests with the same context run the context once;
    its KV cache is copied for each continuation, and the first continuation token is read off the context's
    last logits (so single-token continuations, e.g. MMLU's letters, cost no second pass). Otherwise each
    context+continuation runs in full (left-padded batches, sorted by length). A context is cut from the left
    so that it and its longest continuation fit in `max_length` + 1 tokens (the last token is only predicted).
    """
    import torch

    from ftlab.models.structure import eval_mode, model_device, pad_id

    if share_context is None:
        share_context = not _is_prompt_learning(model)
    keep = _supports_logits_to_keep(model)
    device, pad = model_device(model), pad_id(tokenizer)
    out = [0.0] * len(requests)
    with eval_mode(model), torch.inference_mode():
        if share_context:
            ok = _mc_shared(model, requests, batch_size, max_length, keep, device, pad, out)
            if ok:
                return out
        _mc_full(model, requests, batch_size, max_length, keep, device, pad, out)
    return out


def _token_lls(hidden, head, targets):
    """log_softmax(logits)[target] at every position, the head applied a chunk of positions at a time: hidden
    [B,T,H] (the logits when `head` is None), targets [B,T] or [B,T,K] (K targets per position) -> the same shape."""
    from ftlab.models.logits import chunk_positions, map_tokens, token_logprob, vocab_size

    vocab = vocab_size(head) if head is not None else hidden.shape[-1]
    chunk = chunk_positions(vocab, rows=hidden.shape[0])
    if targets.dim() == 2:
        return map_tokens(hidden, head, lambda lg, t: token_logprob(lg, t.unsqueeze(-1)).squeeze(-1), targets,
                          chunk=chunk)
    return map_tokens(hidden, head, token_logprob, targets, chunk=chunk)


_LOGITS_BUDGET = 1 << 25  # logits kept by the context pass of multiple choice: 32 M floats (128 MB in fp32)


def _vocab_size(model) -> int:
    n = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(n) if n else 1 << 18  # unknown: assume large (the masked path is always safe)


def _trim_context(ctx: list[int], longest: int, max_length: int) -> list[int]:
    """The context cut from the left so that it and its longest continuation fit: every continuation of a
    context sees the same (cut) context, whichever path scores it."""
    return ctx[-max(1, max_length + 1 - longest):]


def _mc_shared(model, requests, batch_size, max_length, keep, device, pad, out) -> bool:
    import torch

    from ftlab.models.logits import head_split
    from ftlab.utils.padding import left_pad, length_batches, pad_batch, right_pad

    groups: dict[tuple, list[int]] = {}
    for j, (ctx, _) in enumerate(requests):
        groups.setdefault(tuple(ctx), []).append(j)
    keys = list(groups)
    for chosen in length_batches([len(c) for c in keys], batch_size):  # context padding <= MAX_PADDING a batch
        ctxs = [keys[i] for i in chosen]
        trimmed = [_trim_context(list(c), max(len(requests[j][1]) for j in groups[c]), max_length) for c in ctxs]
        # Right padding and no attention mask: causal attention never lets a real token see a later pad, and
        # without a padding mask the attention runs its plain causal kernel (what lm-eval's HF backend does),
        # ~8% faster on CPU than with a materialised mask. The continuation pass masks the pads in the cache.
        # The last real tokens then sit in different columns: logits are kept from the shortest context's last
        # token on, unless that is too much memory (large vocabularies, contexts of very different lengths):
        # then left padding with a mask, where every context ends in the last column.
        lengths = [len(c) for c in trimmed]
        spread = max(lengths) - min(lengths) + 1
        if not keep or spread * len(ctxs) * _vocab_size(model) <= _LOGITS_BUDGET:
            ids, mask = right_pad(trimmed, pad, device)
            lens = mask.sum(-1)
            res = model(input_ids=ids, use_cache=True, **({"logits_to_keep": spread} if keep else {}))
            rows = torch.arange(len(ctxs), device=device)
            last = res.logits[rows, lens - 1 - (ids.shape[1] - res.logits.shape[1])].float()
        else:
            ids, mask = left_pad(trimmed, pad, device)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
            last = res.logits[:, -1].float()
        last = last - last.logsumexp(-1, keepdim=True)
        rest = []  # (batch row, request) for continuations longer than one token
        for b, c in enumerate(ctxs):
            for j in groups[c]:
                cont = requests[j][1]
                if not cont:
                    continue
                out[j] = float(last[b, cont[0]])
                if len(cont) > 1:
                    rest.append((b, j))
        if not rest:
            continue
        cache = res.cache
        if not _can_share(model, cache):
            return False
        ctx_len = mask.sum(-1)
        if _packed_rest(model, requests, rest, len(ctxs), cache, mask, ctx_len, pad, device, out):
            continue
        # continuations of similar length share a batch: padding of the second pass is wasted compute
        rest.sort(key=lambda bj: -len(requests[bj[1]][1]))
        for s in range(0, len(rest), batch_size):
            part = rest[s:s + batch_size]
            idx = torch.tensor([b for b, _ in part], dtype=torch.long, device=device)
            conts = [requests[j][1] for _, j in part]
            width = max(len(c) for c in conts) - 1
            inp, cmask = right_pad([c[:-1] for c in conts], pad, device)
            tgt = pad_batch([c[1:] for c in conts], 0).to(device)
            attn = torch.cat([mask[idx], cmask], dim=1)
            cpos = ctx_len[idx].unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0)
            with head_split(model) as head:
                hidden = model(input_ids=inp, attention_mask=attn, position_ids=cpos, cache=_select_cache(cache, idx),
                               use_cache=True).logits
            lls = (_token_lls(hidden, head, tgt) * cmask).sum(-1).tolist()
            for (_, j), v in zip(part, lls):
                out[j] += v
    return True


# Packing every choice of a context into one row pays when the packed rows stay short: the cost of a row is its
# length times (context + row length), so one row of all k choices replaces k cache copies only while the choices
# are short. Above this many packed tokens per context the per-choice pass runs instead.
_PACK_MAX_TOKENS = 64


def _packed_rest(model, requests, rest, n_ctx, cache, mask, ctx_len, pad, device, out) -> bool:
    """The second pass with every choice of a context in ONE row on top of that context's cache: each choice's
    tokens restart at the context's length and see the context and their own earlier tokens only (a block-diagonal
    causal 4D mask). The cache is used once, as it is: no copy of it per choice. False (nothing done) when a
    packed row would be long, or the model takes no 4D mask."""
    import torch

    from ftlab.models.logits import head_split

    rows: list[list[tuple[int, list[int]]]] = [[] for _ in range(n_ctx)]  # per context: (request, its tokens)
    for b, j in rest:
        rows[b].append((j, requests[j][1]))
    width = max(sum(len(c) - 1 for _, c in r) for r in rows)
    if width > _PACK_MAX_TOKENS or getattr(model.config, "_attn_implementation", "eager") not in ("eager", "sdpa"):
        return False
    S = mask.shape[1]
    inp = torch.full((n_ctx, width), pad, dtype=torch.long)
    tgt = torch.zeros((n_ctx, width), dtype=torch.long)
    pos = torch.zeros((n_ctx, width), dtype=torch.long)
    allow = torch.zeros((n_ctx, width, S + width), dtype=torch.bool)
    allow[:, :, :S] = mask.bool().cpu()[:, None, :]  # every continuation token sees its context's real tokens
    spans: list[tuple[int, int, int, int]] = []  # (row, start, length, request)
    for b, r in enumerate(rows):
        at = 0
        for j, c in r:
            m = len(c) - 1
            inp[b, at:at + m] = torch.tensor(c[:-1])
            tgt[b, at:at + m] = torch.tensor(c[1:])
            pos[b, at:at + m] = int(ctx_len[b]) + torch.arange(m)
            allow[b, at:at + m, S + at:S + at + m] = torch.ones(m, m, dtype=torch.bool).tril()
            spans.append((b, at, m, j))
            at += m
    dtype = next(model.parameters()).dtype
    bias = torch.zeros(allow.shape, dtype=dtype).masked_fill_(~allow, torch.finfo(dtype).min)
    with head_split(model) as head:
        hidden = model(input_ids=inp.to(device), attention_mask=bias[:, None].to(device), position_ids=pos.to(device),
                       cache=cache, use_cache=True).logits
    ll = _token_lls(hidden, head, tgt.to(device))
    for b, at, m, j in spans:
        out[j] += float(ll[b, at:at + m].sum())
    return True


def _mc_full(model, requests, batch_size, max_length, keep, device, pad, out) -> None:
    import torch

    from ftlab.models.logits import head_split
    from ftlab.utils.padding import left_pad, length_batches

    # identical inputs (same context + continuation[:-1], same length) run once: single-token choices share
    longest: dict[tuple, int] = {}
    for ctx, cont in requests:
        longest[tuple(ctx)] = max(longest.get(tuple(ctx), 0), len(cont))
    groups: dict[tuple, list[int]] = {}
    for j, (ctx, cont) in enumerate(requests):
        if not cont:
            continue
        seq = (_trim_context(ctx, longest[tuple(ctx)], max_length) + cont)[:-1]
        groups.setdefault((tuple(seq), len(cont)), []).append(j)
    keys = list(groups)
    for batch in length_batches([len(g[0]) for g in keys], batch_size):  # padding <= MAX_PADDING a batch
        part = [keys[i] for i in batch]
        ids, mask = left_pad([g[0] for g in part], pad, device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        n = max(g[1] for g in part)
        kw = {"logits_to_keep": n} if keep else {}
        with head_split(model) as head:
            hidden = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).logits[:, -n:]
        # the requests of a group share their input and differ in the last token: K targets per position
        k_max = max(len(groups[g]) for g in part)
        tgt = torch.zeros((len(part), n, k_max), dtype=torch.long)
        for b, g in enumerate(part):
            for k, j in enumerate(groups[g]):
                cont = requests[j][1]
                tgt[b, n - len(cont):, k] = torch.tensor(cont)
        lps = _token_lls(hidden, head, tgt.to(device))
        for b, g in enumerate(part):
            for k, j in enumerate(groups[g]):
                out[j] = float(lps[b, n - len(requests[j][1]):, k].contiguous().sum())


def predict_multiple_choice(model, tokenizer, task: Task, batch_size: int,
                            share_context: Optional[bool] = None) -> list[dict]:
    per_row = mc_requests(task, tokenizer)
    flat = [p for pairs in per_row for p in pairs]
    encoded, window = encode_pairs(tokenizer, flat), model_max_length(model, task)
    lls = mc_loglikelihoods(model, tokenizer, encoded, batch_size, window, share_context=share_context)
    preds, k = [], 0
    for r, pairs in zip(task.rows, per_row):
        row = encoded[k:k + len(pairs)]
        # contexts cut from the left to fit the window with their longest continuation (_trim_context), counted
        cut = max(len(c) - len(_trim_context(c, max(len(x) for _, x in row), window)) for c, _ in row)
        preds.append({"id": r["id"], "loglikelihoods": lls[k:k + len(pairs)], **({"context_tokens_cut": cut} if cut else {})})
        k += len(pairs)
    return preds


def _argmax(xs: list[float]) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def mc_choice_lengths(row: dict) -> list[int]:
    """Characters of each continuation (acc_norm divides by these, as lm-evaluation-harness does)."""
    if "contexts" in row:
        return [len(row["continuation"])] * len(row["contexts"])
    return [len(c) for c in row["choices"]]


def score_multiple_choice(task: Task, predictions: list[dict]) -> tuple[dict, list[dict]]:
    """acc: the highest log-likelihood is the label; acc_norm: the same after dividing each log-likelihood by
    its continuation's length in characters. Ties go to the first choice. A prediction without
    log-likelihoods (``{"id", "prediction": index}``) is scored for acc only (acc_norm = acc)."""
    preds = by_id(task, predictions, None)
    items = []
    for r in task.rows:
        p = preds[r["id"]]
        n_choices = len(r["contexts"]) if "contexts" in r else len(r["choices"])
        if p.get("loglikelihoods") is not None:
            lls = [float(x) for x in p["loglikelihoods"]]
            if len(lls) != n_choices:
                raise ValueError(f"predictions for {task.name!r}: item {r['id']!r} has {len(lls)} log-likelihoods "
                                 f"for {n_choices} choices")
            lengths = mc_choice_lengths(r)
            pred = _argmax(lls)
            pred_norm = _argmax([ll / max(n, 1) for ll, n in zip(lls, lengths)])
        elif "prediction" in p:
            pred = pred_norm = _choice_index(p["prediction"], r, task.name)
            lls = None
        else:
            raise ValueError(f"predictions for {task.name!r}: item {r['id']!r} has neither 'loglikelihoods' nor "
                             "'prediction'")
        acc, acc_norm = 100.0 * (pred == r["label"]), 100.0 * (pred_norm == r["label"])
        items.append({"id": r["id"], "label": r["label"], "loglikelihoods": lls, "prediction": pred,
                      "prediction_norm": pred_norm, "acc": acc, "acc_norm": acc_norm,
                      "score": acc_norm if task.metric == "acc_norm" else acc,
                      **({"context_tokens_cut": p["context_tokens_cut"]} if p.get("context_tokens_cut") else {})})
    metrics = {"acc": mean([i["acc"] for i in items]), "acc_norm": mean([i["acc_norm"] for i in items])}
    cut = sum(1 for i in items if i.get("context_tokens_cut"))
    if cut:  # contexts cut from the left to fit the window (lm-eval cuts the same way)
        metrics["prompts_truncated"] = cut
    return metrics, items


def _choice_index(pred: Any, row: dict, name: str) -> int:
    """A predicted choice given as an index, or as the text of a choice (or a letter A-J)."""
    n = len(row["contexts"]) if "contexts" in row else len(row["choices"])
    if isinstance(pred, bool):
        raise ValueError(f"predictions for {name!r}: item {row['id']!r}: prediction {pred!r} is not a choice")
    if isinstance(pred, int) and 0 <= pred < n:
        return pred
    if isinstance(pred, str):
        s = pred.strip()
        if "choices" in row and s in [c.strip() for c in row["choices"]]:
            return [c.strip() for c in row["choices"]].index(s)
        if len(s) == 1 and s.upper() in "ABCDEFGHIJ"[:n]:
            return "ABCDEFGHIJ".index(s.upper())
        if s.isdigit() and 0 <= int(s) < n:
            return int(s)
    raise ValueError(f"predictions for {name!r}: item {row['id']!r}: prediction {pred!r} is not one of the "
                     f"{n} choices (give an index, a choice's text, or a letter)")


register_kind(Kind("multiple_choice", KIND_METRICS["multiple_choice"], predict_multiple_choice, score_multiple_choice))
