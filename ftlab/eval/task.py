"""Evaluation tasks and their kinds.

A task kind (`KINDS`) is a pair of functions:

- ``predict(model, tokenizer, task, batch_size) -> predictions``: what the model produces, one dict per item
  (generation: ``{"id", "prediction"}``; perplexity and loglikelihood_rolling: ``{"id", "nll", "n_tokens"}``;
  multiple choice: ``{"id", "loglikelihoods"}``);
- ``score(task, predictions) -> (metrics, items)``: the task's metrics and the per-item records.

Each kind registers itself beside its code (`ftlab.eval.generation`, `.perplexity`, `.multiple_choice`,
`.lm_eval_adapter`); `ftlab.eval.evaluate.evaluate` is ``score(predict(...))`` and
`ftlab.eval.scoring.score_predictions` is ``score`` alone, on predictions read from a file (``ftlab score``), so
outputs of other systems are scored exactly the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable, Optional

from ftlab.config.names import PROMPT_FORMATS as FORMATS
from ftlab.config.registry import Registry

__all__ = ["Task", "Kind", "KINDS", "register_kind", "model_max_length", "EVAL_SEED", "FORMATS"]

# No hand-bumped eval version: the base cache keys on a hash of the prediction code itself and re-scores cached
# predictions with today's scorer (ftlab.eval.cache.prediction_code).
EVAL_SEED = 0  # eval sets do not depend on the run seed: every run of a sweep is scored on the same items

# Metrics where lower is better, and their unit: none is in points, so a run's summary keeps them out of the point
# means and reports their relative change (ftlab.eval.metrics.summarize: forget_ppl_change_pct).
LOWER_IS_BETTER_UNITS = {"perplexity": "ppl", "word_perplexity": "ppl", "byte_perplexity": "ppl",
                         "bits_per_byte": "bits/byte"}


@dataclass
class Task:
    """One evaluation task: a kind, its rows (see `ftlab.eval.builtin` for each kind's row format) and how to score.

    `meta` is recorded with every score (source, file hash, few-shot count and examples, prompt format, chat
    template hash); `metric` is the primary metric (default: the kind's first).
    """

    name: str
    role: str  # target | forget
    kind: str  # generation | perplexity | loglikelihood_rolling | multiple_choice
    rows: list[dict]
    answer: str = "exact"  # generation: how a prediction is read (exact | number)
    max_new_tokens: int = 16
    meta: dict = field(default_factory=dict)
    metric: str = ""  # primary metric; "" -> the kind's default
    format: str = "plain"  # plain | chat (the context is the user turn of the tokenizer's chat template)
    delimiter: str = " "  # multiple choice: between context and continuation (plain format)
    max_length: Optional[int] = None  # perplexity/multiple choice: tokens per window (None: the model's)
    stop: tuple[str, ...] = ()  # generation: a continuation ends at the first of these strings (lm-eval's `until`)

    def __post_init__(self) -> None:
        kind = KINDS.get(self.kind, f"task {self.name!r}: kind")  # ConfigError (a ValueError): did you mean
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
        return bool(self.meta.get("higher_is_better", self.metric not in LOWER_IS_BETTER_UNITS))

    @property
    def unit(self) -> str:
        """points (0-100, accuracy-like), ppl, or what a plug-in kind sets in meta["unit"] (lm_eval)."""
        return self.meta.get("unit") or LOWER_IS_BETTER_UNITS.get(self.metric, "points")

    def signature(self) -> dict:
        """Everything about the task that can change its score (the model's side is added by `evaluate`)."""
        rows = hashlib.sha256(json.dumps(self.rows, sort_keys=True).encode()).hexdigest()
        return {"name": self.name, "kind": self.kind, "metric": self.metric, "answer": self.answer,
                "max_new_tokens": self.max_new_tokens, "format": self.format, "delimiter": self.delimiter,
                "max_length": self.max_length, "rows": rows, "n": len(self.rows), "meta": self.meta,
                "seed": EVAL_SEED, **({"stop": list(self.stop)} if self.stop else {})}


@dataclass(frozen=True)
class Kind:
    name: str
    metrics: tuple[str, ...]  # the first is the default primary metric; () = any name the task gives
    predict: Callable[..., list[dict]]
    score: Callable[["Task", list[dict]], tuple[dict, list[dict]]]


KINDS: Registry[Kind] = Registry("task kind", "kind")


def register_kind(kind: Kind) -> None:
    """Add a task kind (name, metrics, predict, score), beside its code."""
    KINDS.register(kind.name, kind)


def model_max_length(model, task: Task) -> int:
    """Tokens per window of a perplexity or multiple-choice task: the task's max_length, else the model's
    position limit (at most 4096), else 2048."""
    if task.max_length:
        return task.max_length
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
    return int(min(n, 4096)) if n else 2048
