"""`ftlab score TASK PREDICTIONS.jsonl`: score saved predictions with a built-in task's metric (no model)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["score_command", "SCORE_USAGE"]

SCORE_USAGE = """\
usage: ftlab score TASK PREDICTIONS.jsonl [--path FILE] [-n N] [--few-shot K] [--metric M] [--subset A,B]
                   [--fewshot-path FILE] [--split S] [--revision R] [--items OUT.jsonl]

Score saved predictions with a built-in task's metric, exactly as evaluation does (no model is loaded).
PREDICTIONS: one JSON object per line, matched to the task's items by id (<task>/<index>; every item once):
  generation (gsm8k)        {"id", "prediction": "generated text"}       -> strict_match, flexible_extract
                                                                            (lm-eval's), robust_match (ftlab's)
  multiple choice           {"id", "loglikelihoods": [one per choice]}   -> acc and acc_norm
                            {"id", "prediction": index | choice text}    -> acc
  rolling (wikitext)        {"id", "nll": summed NLL of the page}        -> word_perplexity, byte_perplexity,
                                                                            bits_per_byte (words, bytes: the page's)
  perplexity (wikitext_lines) {"id", "nll": summed NLL, "n_tokens"}      -> perplexity (per token)
ftlab's own records (records/<stage>/<task>.jsonl in a run directory) are valid predictions.
Every line is checked: an object with the item's id; a generation is a JSON string; log-likelihoods, nll and
n_tokens are finite numbers (nll >= 0, n_tokens an integer >= 0), one log-likelihood per choice. A line that is
not is refused (exit 2) with the file, line and field.
--path FILE reads the task's rows from a local .jsonl (the hub dataset's fields) instead of the hub; -n and
--few-shot must match the evaluation that produced the predictions (few-shot changes prompts, not ids).
Prints {task, metric, score, metrics, n, higher_is_better, source} as JSON.
"""


def score_command(args: list[str]) -> int:
    """`ftlab score`: see SCORE_USAGE."""
    import argparse
    import sys

    from ftlab.eval.scoring import read_predictions_at, score_predictions
    from ftlab.eval.suites import load_task
    from ftlab.utils.files import write_jsonl

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
        # scores read references, not prompts: a local file alone scores at 0-shot rather than asking for the
        # few-shot file that evaluation needs (load_builtin refuses a local eval file as its own few-shot pool)
        few_shot = 0 if a.few_shot is None and a.path and not a.fewshot_path else a.few_shot
        task = load_task(a.task, "target", n=a.n, few_shot=few_shot, metric=a.metric, **source)
        rows, where = read_predictions_at(a.predictions)
        res = score_predictions(task, rows, where=where)  # each line checked: file, line and field on a refusal
    except (ValueError, OSError, KeyError) as e:
        text = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split("\n"))
        print(f"ftlab score: {text}", file=sys.stderr)
        return 2
    if a.items:
        write_jsonl(Path(a.items), res["items"])
    out = {k: v for k, v in res.items() if k != "items"}
    out["source"] = task.meta.get("source")
    print(json.dumps(out, indent=2))
    return 0
