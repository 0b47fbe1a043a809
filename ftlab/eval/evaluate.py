"""Evaluation: tasks of three kinds (generation, perplexity, multiple choice), per-item records, scoring of
saved predictions, and a cache of base-model results keyed by everything that can change them.

A task kind (`KINDS`) is a pair of functions:

- ``predict(model, tokenizer, task, batch_size) -> predictions``: what the model produces, one dict per item
  (generation: ``{"id", "prediction"}``; perplexity: ``{"id", "nll", "n_tokens"}``; multiple choice:
  ``{"id", "loglikelihoods"}``);
- ``score(task, predictions) -> (metrics, items)``: the task's metrics and the per-item records.

`evaluate` is ``score(predict(...))``; `score_predictions` is ``score`` alone, on predictions read from a
file (``ftlab score TASK PREDICTIONS.jsonl``), so outputs of other systems are scored exactly the same way.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ftlab.utils.files import atomic_write_json, write_jsonl
from ftlab.utils.progress import Bar

__all__ = ["Task", "Kind", "KINDS", "register_kind", "build_tasks", "load_task", "evaluate",
           "score_predictions", "read_predictions", "apply_format", "mc_loglikelihoods", "EVAL_VERSION"]

# Bump when scoring or prompting changes meaning: cached base results of older versions are not reused.
EVAL_VERSION = 2
EVAL_SEED = 0  # eval sets do not depend on the run seed: every run of a sweep is scored on the same items
FORMATS = ("plain", "chat")


@dataclass
class Task:
    """One evaluation task: a kind, its rows (see `ftlab.eval.builtin` for each kind's row format) and how to score.

    `meta` is recorded with every score (source, file hash, few-shot count and examples, prompt format, chat
    template hash); `metric` is the primary metric (default: the kind's first).
    """

    name: str
    role: str  # target | forget
    kind: str  # generation | perplexity | multiple_choice
    rows: list[dict]
    answer: str = "exact"  # generation: how a prediction is read (exact | number)
    max_new_tokens: int = 16
    meta: dict = field(default_factory=dict)
    metric: str = ""  # primary metric; "" -> the kind's default
    format: str = "plain"  # plain | chat (the context is the user turn of the tokenizer's chat template)
    delimiter: str = " "  # multiple choice: between context and continuation (plain format)
    max_length: Optional[int] = None  # perplexity/multiple choice: tokens per window (None: the model's)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: unknown kind {self.kind!r}; known: {', '.join(KINDS)}")
        kind = KINDS[self.kind]
        self.metric = self.metric or (kind.metrics[0] if kind.metrics else "")
        if not self.metric:
            raise ValueError(f"task {self.name!r}: kind {self.kind} needs a metric name")
        if kind.metrics and self.metric not in kind.metrics:
            raise ValueError(f"task {self.name!r}: kind {self.kind} has no metric {self.metric!r}; "
                             f"valid: {', '.join(kind.metrics)}")
        if self.format not in FORMATS:
            raise ValueError(f"task {self.name!r}: unknown format {self.format!r}; valid: {', '.join(FORMATS)}")

    @property
    def higher_is_better(self) -> bool:
        return bool(self.meta.get("higher_is_better", self.metric != "perplexity"))

    @property
    def unit(self) -> str:
        return "ppl" if self.metric == "perplexity" else "points"

    def signature(self) -> dict:
        """Everything about the task that can change its score (the model's side is added by `evaluate`)."""
        rows = hashlib.sha256(json.dumps(self.rows, sort_keys=True).encode()).hexdigest()
        return {"name": self.name, "kind": self.kind, "metric": self.metric, "answer": self.answer,
                "max_new_tokens": self.max_new_tokens, "format": self.format, "delimiter": self.delimiter,
                "max_length": self.max_length, "rows": rows, "n": len(self.rows), "meta": self.meta,
                "seed": EVAL_SEED, "eval_version": EVAL_VERSION}


@dataclass(frozen=True)
class Kind:
    name: str
    metrics: tuple[str, ...]  # the first is the default primary metric; () = any name the task gives
    predict: Callable[..., list[dict]]
    score: Callable[["Task", list[dict]], tuple[dict, list[dict]]]


KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> None:
    """Add a task kind (name, metrics, predict, score)."""
    KINDS[kind.name] = kind


# ---------------------------------------------------------------------------------------------- task lists
def build_tasks(cfg: Any) -> list[Task]:
    """The run's target tasks and forgetting suite, from the eval config."""
    from ftlab.data.sources import load_eval

    e, limit = cfg.eval, cfg.eval.limit
    tasks: list[Task] = []
    for name in e.target:
        if name == "data":  # the held-out split of the training data; of every stage's data in a continual run
            for d in getattr(cfg, "stages", None) or [cfg.data]:
                rows = load_eval(d, limit, EVAL_SEED)
                tasks.append(Task(d.name, "target", "generation",
                                  [{"id": r["id"], "prompt": r["prompt"], "reference": r["reference"]} for r in rows],
                                  answer=d.answer, max_new_tokens=d.max_new_tokens,
                                  # the prompt as training sees it (train.encode_example applies no chat template)
                                  meta={"source": d.source, "few_shot": 0, "format": "plain"}))
        else:
            tasks.append(_named_task(name, "target", cfg))
    for name in e.forget:
        if name == "world":
            tasks += [_named_task(f"synth_{s}", "forget", cfg) for s in cfg.model.world.skills]
            tasks.append(_named_task("synth_ppl", "forget", cfg))
        else:
            tasks.append(_named_task(name, "forget", cfg))
    names = [t.name for t in tasks]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"eval: task(s) {sorted(dup)} appear twice (as target and forget?)")
    return tasks


def _task_options(cfg: Any, name: str) -> dict:
    """eval.tasks.<name> (set fields only) and eval.paths.<name>, as load_task keyword arguments."""
    import dataclasses

    opts = getattr(cfg.eval, "tasks", {}) or {}
    o = opts.get(name)
    out = {k: v for k, v in (dataclasses.asdict(o) if dataclasses.is_dataclass(o) else dict(o or {})).items()
           if v is not None}
    path = (getattr(cfg.eval, "paths", {}) or {}).get(name)
    if path:
        out["path"] = path
    return out


def _named_task(name: str, role: str, cfg: Any) -> Task:
    from ftlab.eval.builtin import BUILTINS

    if name.startswith("lm_eval:"):
        from ftlab.eval.lm_eval_adapter import load_lm_eval_task

        o = cfg.eval.lm_eval
        return load_lm_eval_task(name[len("lm_eval:"):], role, n=cfg.eval.limit, include_path=o.include_path,
                                 num_fewshot=o.num_fewshot, metric=o.metric)
    if name in BUILTINS:
        opts = _task_options(cfg, name)
        opts.setdefault("n", cfg.eval.limit)
        return load_task(name, role, **opts)

    from ftlab.world import skills

    n = cfg.eval.limit or 200
    if name == "synth_ppl":
        # Held-out pretraining examples, scored on their answers (what pretraining trained), skills interleaved.
        per = -(-n // len(cfg.model.world.skills))
        pools = [skills.make_examples(sk, "test", per, seed=EVAL_SEED) for sk in cfg.model.world.skills]
        rows = [pool[j] for j in range(per) for pool in pools if j < len(pool)][:n]
        return Task(name, role, "perplexity",
                    [{"id": f"ppl-{r['id']}", "context": r["prompt"], "text": r["response"]} for r in rows],
                    meta={"source": "world", "scored": "answers"})
    if name.startswith("synth_") and name[6:] in skills.ALL_SKILLS:
        rows = skills.make_examples(name[6:], "test", n, seed=EVAL_SEED)
        return Task(name, role, "generation",
                    [{"id": r["id"], "prompt": r["prompt"], "reference": r["response"]} for r in rows],
                    answer="exact", max_new_tokens=max(len(r["response"]) for r in rows) + 2,
                    meta={"source": "world", "few_shot": 0, "format": "plain"})
    raise ValueError(f"eval: unknown task {name!r}; known here: data, world, synth_ppl, "
                     + ", ".join(f"synth_{s}" for s in skills.ALL_SKILLS) + ", " + ", ".join(BUILTINS))


def load_task(name: str, role: str = "target", *, n: Optional[int] = None, few_shot: Optional[int] = None,
              format: str = "plain", metric: Optional[str] = None, max_new_tokens: Optional[int] = None,
              max_length: Optional[int] = None, **source: Any) -> Task:
    """A built-in task (`ftlab.eval.builtin.BUILTINS`) as a `Task`.

    Args:
        name: arc_challenge, arc_easy, hellaswag, winogrande, boolq, mmlu, wikitext or gsm8k.
        role: target | forget.
        n: the first n rows (None: all); few_shot: examples per item (None: the task's default).
        format: plain | chat; metric: the primary metric (e.g. acc instead of acc_norm).
        max_new_tokens: generation cap (gsm8k); max_length: token window (perplexity, multiple choice).
        **source: path, fewshot_path, subset, split, hf_path, hf_name, revision (see `ftlab.eval.builtin.load_builtin`).
    """
    from ftlab.eval.builtin import BUILTINS, load_builtin

    spec = BUILTINS[name] if name in BUILTINS else None
    if spec is None:
        raise ValueError(f"eval: unknown built-in task {name!r}; known: {', '.join(BUILTINS)}")
    rows, meta = load_builtin(name, n=n, few_shot=few_shot, **source)
    meta["format"] = format
    return Task(name, role, spec.kind, rows, answer=spec.answer,
                max_new_tokens=max_new_tokens or spec.max_new_tokens, meta=meta, metric=metric or spec.metric,
                format=format, delimiter=" " if format == "plain" else "", max_length=max_length)


# -------------------------------------------------------------------------------------------- model helpers
def apply_format(tokenizer, text: str, fmt: str) -> str:
    """The text fed to the model: as is (plain), or as the user turn of the tokenizer's chat template followed
    by the assistant's generation prompt (chat; a leading BOS the tokenizer adds itself is not doubled)."""
    if fmt == "plain":
        return text
    if fmt != "chat":
        raise ValueError(f"unknown prompt format {fmt!r}; valid: {', '.join(FORMATS)}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt format 'chat': the tokenizer has no chat template; use format=plain")
    s = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and s.startswith(bos) and _adds_bos(tokenizer):
        s = s[len(bos):]
    return s


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def tokenizer_signature(tokenizer, fmt: str = "plain") -> dict:
    """What about the tokenizer changes scores: its name, size, special ids and (chat) template."""
    tmpl = getattr(tokenizer, "chat_template", None) if fmt == "chat" else None
    return {"name": getattr(tokenizer, "name_or_path", ""), "size": len(tokenizer),
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
            "chat_template": hashlib.sha256(tmpl.encode()).hexdigest()[:16] if isinstance(tmpl, str) else None}


def _device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:
        import torch

        return torch.device("cpu")


def _model_max_length(model, task: Task) -> int:
    if task.max_length:
        return task.max_length
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
    return int(min(n, 4096)) if n else 2048


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


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


class _eval_mode:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


# ------------------------------------------------------------------------------------------------ generation
def predict_generation(model, tokenizer, task: Task, batch_size: int) -> list[dict]:
    from ftlab.models.generate import greedy_decode

    prompts = [apply_format(tokenizer, r["prompt"], task.format) for r in task.rows]
    preds = greedy_decode(model, tokenizer, prompts, task.max_new_tokens, batch_size=batch_size)
    return [{"id": r["id"], "prediction": p} for r, p in zip(task.rows, preds)]


def score_generation(task: Task, predictions: list[dict]) -> tuple[dict, list[dict]]:
    """exact_match (points) with `ftlab.data.answers.score(task.answer, prediction, reference)` per item."""
    from ftlab.data.answers import score

    by_id = _by_id(task, predictions, "prediction")
    items = []
    for r in task.rows:
        p = by_id[r["id"]]["prediction"]
        items.append({"id": r["id"], "prompt": r["prompt"], "reference": r["reference"], "prediction": p,
                      "score": score(task.answer, p, r["reference"])})
    return {"exact_match": _mean([i["score"] for i in items])}, items


# ------------------------------------------------------------------------------------------------ perplexity
def predict_perplexity(model, tokenizer, task: Task, batch_size: int) -> list[dict]:
    """Summed NLL and token count of every text; every token after the first is predicted once.

    A text longer than the window (task.max_length or the model's) is cut into windows that overlap by one
    token: window j reads tokens [j(L-1), j(L-1)+L) and predicts all but its first.
    """
    import torch

    device, pad, L = _device(model), _pad_id(tokenizer), _model_max_length(model, task)
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
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = [windows[j] for j in order[start:start + batch_size]]
            width = max(len(w) for _, _, w in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)  # tokens whose NLL counts
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, (i, s, w) in enumerate(chunk):
                ids[b, :len(w)] = torch.tensor(w)
                attn[b, :len(w)] = 1
                # position k of the window predicts token s + k + 1 of the row: counted from first[i] on
                lo = max(first[i] - s, 1)
                mask[b, lo:len(w)] = 1
            ids, mask, attn = ids.to(device), mask.to(device), attn.to(device)
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            tok_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            sums = (tok_nll * mask[:, 1:]).sum(-1).tolist()
            for (i, _, _), v in zip(chunk, sums):
                nll[i] += v
    return [{"id": r["id"], "nll": v, "n_tokens": max(len(e) - f, 0)}
            for r, e, f, v in zip(task.rows, enc, first, nll)]


def score_perplexity(task: Task, predictions: list[dict]) -> tuple[dict, list[dict]]:
    """Corpus perplexity exp(sum NLL / sum tokens) and the mean NLL per token."""
    by_id = _by_id(task, predictions, "nll")
    items = []
    for r in task.rows:
        p = by_id[r["id"]]
        if "n_tokens" not in p:
            raise ValueError(f"predictions for {task.name!r}: item {r['id']!r} has 'nll' but no 'n_tokens'")
        items.append({"id": r["id"], "nll": float(p["nll"]), "n_tokens": int(p["n_tokens"])})
    total, count = sum(i["nll"] for i in items), sum(i["n_tokens"] for i in items)
    return {"perplexity": math.exp(total / count) if count else float("nan"),
            "nll_per_token": total / count if count else float("nan")}, items


# ------------------------------------------------------------------------------------------- multiple choice
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


def _encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """lm-evaluation-harness's pair encoding: trailing spaces of the context move to the continuation; the
    continuation's tokens are those of tok(context + continuation) after the first len(tok(context))."""
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
            c = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else _pad_id(tokenizer)]
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
    return isinstance(cache, DynamicCache) and all(hasattr(l, "keys") for l in getattr(cache, "layers", [None]))


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

    if share_context is None:
        share_context = not _is_prompt_learning(model)
    keep = _supports_logits_to_keep(model)
    device, pad = _device(model), _pad_id(tokenizer)
    out = [0.0] * len(requests)
    with _eval_mode(model), torch.inference_mode():
        if share_context:
            ok = _mc_shared(model, requests, batch_size, max_length, keep, device, pad, out)
            if ok:
                return out
        _mc_full(model, requests, batch_size, max_length, keep, device, pad, out)
    return out


def _gather_ll(logits, targets, mask):
    """Sum over positions of log_softmax(logits)[target], where mask is 1; logits [B,T,V], targets/mask [B,T]."""
    logits = logits.float()
    tok = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (tok * mask).sum(-1)


def _left_pad(seqs, pad, device):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


_LOGITS_BUDGET = 1 << 25  # logits kept by the context pass of multiple choice: 32 M floats (128 MB in fp32)


def _vocab_size(model) -> int:
    n = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(n) if n else 1 << 18  # unknown: assume large (the masked path is always safe)


def _right_pad(seqs, pad, device):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def _trim_context(ctx: list[int], longest: int, max_length: int) -> list[int]:
    """The context cut from the left so that it and its longest continuation fit: every continuation of a
    context sees the same (cut) context, whichever path scores it."""
    return ctx[-max(1, max_length + 1 - longest):]


def _mc_shared(model, requests, batch_size, max_length, keep, device, pad, out) -> bool:
    import torch

    groups: dict[tuple, list[int]] = {}
    for j, (ctx, _) in enumerate(requests):
        groups.setdefault(tuple(ctx), []).append(j)
    order = sorted(groups, key=lambda c: -len(c))
    for start in range(0, len(order), batch_size):
        ctxs = order[start:start + batch_size]
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
            ids, mask = _right_pad(trimmed, pad, device)
            lens = mask.sum(-1)
            res = model(input_ids=ids, use_cache=True, **({"logits_to_keep": spread} if keep else {}))
            rows = torch.arange(len(ctxs), device=device)
            last = res.logits[rows, lens - 1 - (ids.shape[1] - res.logits.shape[1])].float()
        else:
            ids, mask = _left_pad(trimmed, pad, device)
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
        cache = res.past_key_values
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
            inp = torch.full((len(part), width), pad, dtype=torch.long)
            tgt = torch.zeros((len(part), width), dtype=torch.long)
            cmask = torch.zeros((len(part), width), dtype=torch.long)
            for r, c in enumerate(conts):
                inp[r, :len(c) - 1] = torch.tensor(c[:-1])
                tgt[r, :len(c) - 1] = torch.tensor(c[1:])
                cmask[r, :len(c) - 1] = 1
            inp, tgt, cmask = inp.to(device), tgt.to(device), cmask.to(device)
            attn = torch.cat([mask[idx], cmask], dim=1)
            cpos = ctx_len[idx].unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0)
            r2 = model(input_ids=inp, attention_mask=attn, position_ids=cpos,
                       past_key_values=_select_cache(cache, idx), use_cache=True)
            lls = _gather_ll(r2.logits, tgt, cmask).tolist()
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
    logits = model(input_ids=inp.to(device), attention_mask=bias[:, None].to(device), position_ids=pos.to(device),
                   past_key_values=cache, use_cache=True).logits.float()
    ll = logits.gather(-1, tgt.to(device).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    for b, at, m, j in spans:
        out[j] += float(ll[b, at:at + m].sum())
    return True


def _mc_full(model, requests, batch_size, max_length, keep, device, pad, out) -> None:
    import torch

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
    order = sorted(groups, key=lambda g: -len(g[0]))
    for start in range(0, len(order), batch_size):
        part = order[start:start + batch_size]
        ids, mask = _left_pad([list(g[0]) for g in part], pad, device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        n = max(g[1] for g in part)
        kw = {"logits_to_keep": n} if keep else {}
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).logits[:, -n:]
        for b, g in enumerate(part):
            for j in groups[g]:
                cont = requests[j][1]
                m = len(cont)
                row = logits[b, n - m:].float()
                lp = row.gather(-1, torch.tensor(cont, device=device).unsqueeze(-1)).squeeze(-1) - row.logsumexp(-1)
                out[j] = float(lp.sum())


def predict_multiple_choice(model, tokenizer, task: Task, batch_size: int,
                            share_context: Optional[bool] = None) -> list[dict]:
    per_row = mc_requests(task, tokenizer)
    flat = [p for pairs in per_row for p in pairs]
    lls = mc_loglikelihoods(model, tokenizer, _encode_pairs(tokenizer, flat), batch_size,
                            _model_max_length(model, task), share_context=share_context)
    preds, k = [], 0
    for r, pairs in zip(task.rows, per_row):
        preds.append({"id": r["id"], "loglikelihoods": lls[k:k + len(pairs)]})
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
    by_id = _by_id(task, predictions, None)
    items = []
    for r in task.rows:
        p = by_id[r["id"]]
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
                      "score": acc_norm if task.metric == "acc_norm" else acc})
    return {"acc": _mean([i["acc"] for i in items]), "acc_norm": _mean([i["acc_norm"] for i in items])}, items


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


# ----------------------------------------------------------------------------------------------- the registry
register_kind(Kind("generation", ("exact_match",), predict_generation, score_generation))
register_kind(Kind("perplexity", ("perplexity",), predict_perplexity, score_perplexity))
register_kind(Kind("multiple_choice", ("acc", "acc_norm"), predict_multiple_choice, score_multiple_choice))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _by_id(task: Task, predictions: list[dict], needed: Optional[str]) -> dict[str, dict]:
    by_id: dict[str, dict] = {}
    for p in predictions:
        if "id" not in p:
            raise ValueError(f"predictions for {task.name!r}: a row has no 'id': {str(p)[:120]}")
        if needed is not None and needed not in p:
            raise ValueError(f"predictions for {task.name!r}: item {p['id']!r} has no {needed!r}")
        if p["id"] in by_id:
            raise ValueError(f"predictions for {task.name!r}: item {p['id']!r} appears twice")
        by_id[str(p["id"])] = p
    ids = [r["id"] for r in task.rows]
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"predictions for {task.name!r}: {len(missing)} of {len(ids)} items have no prediction "
                         f"(e.g. {missing[:3]}); ids look like {ids[0]!r}")
    extra = set(by_id) - set(ids)
    if extra:
        raise ValueError(f"predictions for {task.name!r}: {len(extra)} ids are not items of the task "
                         f"(e.g. {sorted(extra)[:3]}); ids look like {ids[0]!r}")
    return by_id


# ------------------------------------------------------------------------------------------------- scoring
def score_predictions(task: Task, predictions: list[dict]) -> dict:
    """Score saved predictions with the task's metric, exactly as `evaluate` does (no model needed).

    predictions: one dict per item of `task`, matched by ``id`` (every item exactly once):
      generation ``{"id", "prediction": text}``; perplexity ``{"id", "nll", "n_tokens"}``; multiple choice
      ``{"id", "loglikelihoods": [one per choice]}`` (or ``{"id", "prediction": index | choice text}``, acc
      only). Records written by `evaluate` (records/<stage>/<task>.jsonl) are valid predictions.

    Returns ``{"task", "metric", "score", "metrics", "n", "higher_is_better", "items"}``.
    """
    metrics, items = KINDS[task.kind].score(task, predictions)
    return {"task": task.name, "metric": task.metric, "score": metrics[task.metric], "metrics": metrics,
            "n": len(items), "higher_is_better": task.higher_is_better, "items": items}


def read_predictions(path: str | Path) -> list[dict]:
    """Rows of a .jsonl predictions file (or a .json list)."""
    p = Path(path).expanduser()
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno} is not valid JSON ({e.msg}); one object per line") from None
    return rows


def cache_key(task: Task, fingerprint: str, tokenizer=None) -> str:
    """The base-result cache key: model weights, tokenizer, and the task's signature."""
    tok = tokenizer_signature(tokenizer, task.format) if tokenizer is not None else None
    return hashlib.sha256(json.dumps({"model": fingerprint, "tokenizer": tok, "task": task.signature()},
                                     sort_keys=True, default=str).encode()).hexdigest()[:24]


def evaluate(model, tokenizer, tasks: list[Task], batch_size: int, *, stage: str, run_dir: Path,
             cache_dir: Path | None = None, fingerprint: str | None = None,
             progress: bool = True) -> dict[str, dict]:
    """Score every task; write records/<stage>/<task>.jsonl; return {task: {score, metrics, n, cached}}.

    With cache_dir and fingerprint (base evaluation), a result is reused when the model weights, the tokenizer
    and the task's signature (rows, n, few-shot, format, metric, seed, eval version) are unchanged."""
    out: dict[str, dict] = {}
    bar = Bar(len(tasks), f"eval {stage}", "{task.fields[name]}", enabled=progress, name="")
    with bar:
        for task in tasks:
            if task.format == "chat":
                task.meta["chat_template"] = tokenizer_signature(tokenizer, "chat")["chat_template"]
            key = cached = None
            if cache_dir is not None and fingerprint is not None:
                key = cache_key(task, fingerprint, tokenizer)
                path = Path(cache_dir) / f"{key}.json"
                if path.is_file():
                    try:
                        cached = json.loads(path.read_text())
                        cached["metrics"]  # noqa: B018 - entries of older versions lack it
                    except (OSError, json.JSONDecodeError, KeyError, TypeError):
                        cached = None  # a damaged entry is recomputed, not trusted
            if cached is not None:
                metrics, items = cached["metrics"], cached["items"]
            else:
                preds = KINDS[task.kind].predict(model, tokenizer, task, batch_size)
                metrics, items = KINDS[task.kind].score(task, preds)
                if key is not None:
                    Path(cache_dir).mkdir(parents=True, exist_ok=True)
                    atomic_write_json(Path(cache_dir) / f"{key}.json",
                                      {"score": metrics[task.metric], "metrics": metrics, "items": items,
                                       "signature": task.signature()})
            write_jsonl(Path(run_dir) / "records" / stage / f"{task.name}.jsonl", items)
            out[task.name] = {"score": metrics[task.metric], "metrics": metrics, "n": len(items),
                              "cached": cached is not None}
            bar.update(advance=1, name=task.name)
    return out


# ------------------------------------------------------------------------------------------------- CLI
SCORE_USAGE = """\
usage: ftlab score TASK PREDICTIONS.jsonl [--path FILE] [-n N] [--few-shot K] [--metric M] [--subset A,B]
                   [--fewshot-path FILE] [--split S] [--revision R] [--items OUT.jsonl]

Score saved predictions with a built-in task's metric, exactly as evaluation does (no model is loaded).
PREDICTIONS: one JSON object per line, matched to the task's items by id (<task>/<index>; every item once):
  generation (gsm8k)        {"id", "prediction": "generated text"}       -> exact_match on the final number
  multiple choice           {"id", "loglikelihoods": [one per choice]}   -> acc and acc_norm
                            {"id", "prediction": index | choice text}    -> acc
  perplexity (wikitext)     {"id", "nll": summed NLL, "n_tokens"}         -> perplexity
ftlab's own records (records/<stage>/<task>.jsonl in a run directory) are valid predictions.
--path FILE reads the task's rows from a local .jsonl (the hub dataset's fields) instead of the hub; -n and
--few-shot must match the evaluation that produced the predictions (few-shot changes prompts, not ids).
Prints {task, metric, score, metrics, n, higher_is_better, source} as JSON.
"""


def score_command(args: list[str]) -> int:
    """`ftlab score`: see SCORE_USAGE."""
    import argparse
    import sys

    if not args or args[0] in ("-h", "--help"):
        print(SCORE_USAGE)
        return 0 if args else 2
    p = argparse.ArgumentParser(prog="ftlab score", add_help=False)
    p.add_argument("task")
    p.add_argument("predictions")
    p.add_argument("--path")
    p.add_argument("-n", "--n", type=int)
    p.add_argument("--few-shot", type=int)
    p.add_argument("--metric")
    p.add_argument("--subset")
    p.add_argument("--fewshot-path")
    p.add_argument("--split")
    p.add_argument("--revision")
    p.add_argument("--items")
    try:
        a = p.parse_args(args)
    except SystemExit:
        print(SCORE_USAGE, file=sys.stderr)
        return 2
    try:
        source = {k: v for k, v in {"path": a.path, "fewshot_path": a.fewshot_path, "split": a.split,
                                    "revision": a.revision,
                                    "subset": a.subset.split(",") if a.subset else None}.items() if v}
        task = load_task(a.task, "target", n=a.n, few_shot=a.few_shot, metric=a.metric, **source)
        res = score_predictions(task, read_predictions(a.predictions))
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"ftlab score: {e}", file=sys.stderr)
        return 2
    if a.items:
        write_jsonl(Path(a.items), res["items"])
    out = {k: v for k, v in res.items() if k != "items"}
    out["source"] = task.meta.get("source")
    print(json.dumps(out, indent=2))
    return 0
