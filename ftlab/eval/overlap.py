"""Train/eval overlap: how many of a target task's eval items are also training prompts.

An item overlaps when its prompt, normalised (lower case, runs of whitespace as one space, stripped), equals a
normalised training prompt. A built-in task's prompt may start with a few-shot block and a description: the part
after the last blank line (``ftlab.eval.fewshot.FEWSHOT_SEP``), the item itself, is compared too. Multiple-choice
items compare their context (each context, for WinoGrande-style items); perplexity items their text.

`measure_overlap` is run on every target task after the data loads (ftlab.pipeline); the counts go into result.json
(``overlap``). Full overlap (every eval prompt of a target task is a training prompt) is refused
(`OverlapRefused`) unless ``data.allow_overlap=true``; partial overlap is reported on stderr and recorded.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

from ftlab.eval.fewshot import FEWSHOT_SEP

__all__ = ["normalise", "measure_overlap", "OverlapRefused"]

MAX_IDS = 20  # overlapping item ids recorded per task


class OverlapRefused(ValueError):
    """Every eval prompt of a target task is a training prompt: the score would measure memorisation."""


def normalise(text: Any) -> str:
    return " ".join(str(text).lower().split())


def _prompts(row: dict) -> Iterable[str]:
    for key in ("prompt", "context", "text"):
        if isinstance(row.get(key), str):
            yield row[key]
    for c in row.get("contexts") or []:
        if isinstance(c, str):
            yield c


def _candidates(row: dict) -> set[str]:
    out = set()
    for p in _prompts(row):
        out.add(normalise(p))
        if FEWSHOT_SEP in p.strip():
            out.add(normalise(p.strip().rsplit(FEWSHOT_SEP, 1)[1]))
    out.discard("")
    return out


def measure_overlap(train_rows: list[dict], tasks: list, *, allow: bool) -> dict[str, dict]:
    """`{task: {n, overlap, fraction, ids}}` for every target task (ids: the first overlapping items). Raises
    OverlapRefused on full overlap unless `allow`; prints a note on stderr for partial overlap."""
    train = {normalise(r.get("prompt", "")) for r in train_rows}
    train.discard("")  # language-modelling rows (data.mix general text) have no prompt
    out: dict[str, dict] = {}
    for t in tasks:
        if t.role != "target" or not t.rows:
            continue
        hits = [r["id"] for r in t.rows if _candidates(r) & train]
        n = len(t.rows)
        out[t.name] = {"n": n, "overlap": len(hits), "fraction": len(hits) / n, "ids": hits[:MAX_IDS]}
        if len(hits) == n and not allow:
            raise OverlapRefused(
                f"train/eval overlap: target task {t.name!r}: every one of its {n} eval prompts is also a training "
                f"prompt (exact match after normalising case and whitespace), so its score would measure "
                f"memorisation; give held-out eval rows (data.eval_path=FILE.jsonl, or no data.eval_path: a held-out "
                f"slice of data.path), or set data.allow_overlap=true to run it anyway")
        if hits:
            print(f"ftlab: train/eval overlap: {len(hits)} of {n} eval prompts of target task {t.name!r} are also "
                  f"training prompts (e.g. {hits[0]!r}); recorded in result.json overlap", file=sys.stderr)
    return out
