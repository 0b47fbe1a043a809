"""The run's trajectory (eval.curve_every): the target and forgetting tasks scored every N training steps, one
row per scored step in curve.jsonl, so that `ftlab report` can compare methods at the same gain.

    {"step": 0, "tasks": {name: score}, "gain": 0.0, "forgetting": 0.0, "forgetting_max": 0.0, "n": {name: items}}

(world runs add "forgetting_near" and "forgetting_far", ftlab.eval.metrics.forgetting_by_distance).

Step 0 is the base model on the same items; every later row's gain and forgetting are `summarize` against it (so a
curve on a subset, eval.curve_limit, is self-consistent; its last row is the trained model on that subset, not
the tuned evaluation in result.json). Scoring runs under the kinds' own eval mode and inference mode and draws no
random numbers: the training itself is the same with or without a curve (tests/test_report_curve.py checks it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from ftlab.eval.metrics import summarize, task_entry
from ftlab.eval.scoring import MODEL_HINT, checked_score
from ftlab.eval.task import KINDS, Task

__all__ = ["CURVE", "Curve"]

CURVE = "curve.jsonl"


class Curve:
    """Scores `tasks` on the model being trained; `every` steps (and at the last step), rank 0 only."""

    def __init__(self, tasks: list[Task], tokenizer, every: int, batch_size: int, run_dir: Path,
                 target_skill: Optional[str] = None):
        self.tasks, self.tok, self.every, self.batch_size = tasks, tokenizer, int(every), int(batch_size)
        self.target_skill = target_skill  # a world run's target: rows get forgetting_near / forgetting_far
        self.path = Path(run_dir) / CURVE
        self.base: Optional[dict[str, float]] = None

    def due(self, step: int, last: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == last)

    def _scores(self, model) -> tuple[dict[str, float], dict[str, int]]:
        scores, n = {}, {}
        for task in self.tasks:
            preds = KINDS.get(task.kind).predict(model, self.tok, task, self.batch_size)
            metrics, items = checked_score(task, preds, hint=MODEL_HINT)  # a NaN model fails, never a point
            scores[task.name], n[task.name] = float(metrics[task.metric]), len(items)
        return scores, n

    def start(self, model, resumed_at: Optional[int]) -> None:
        """A fresh run scores the base (step 0) and starts the file; a resumed one keeps its rows up to the
        checkpoint's step and re-reads the step-0 base from them."""
        if resumed_at is None:
            self.path.unlink(missing_ok=True)
            self.record(model, 0)
            return
        from ftlab.train.checkpoint import truncate_curve

        if self.path.exists():
            truncate_curve(self.path, resumed_at)
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                if row["step"] == 0:
                    self.base = row["tasks"]
        if self.base is None:  # a checkpoint written before the curve existed: the base is gone with the weights
            raise RuntimeError(f"{self.path}: no step-0 row to resume the curve from; rerun with eval.curve_every=0 "
                               "or start the run over")

    def record(self, model, step: int) -> dict:
        t0 = time.perf_counter()
        scores, n = self._scores(model)
        if self.base is None:
            self.base = dict(scores)
        table = {t.name: task_entry(t.role, t.metric, t.higher_is_better, t.unit, self.base[t.name], scores[t.name],
                                    n[t.name]) for t in self.tasks}
        s = summarize(table, self.target_skill)
        row = {"step": step, "tasks": scores, "gain": s["gain"], "forgetting": s["forgetting"],
               "forgetting_max": s["forgetting_max"], "forget_ppl_change_pct": s["forget_ppl_change_pct"],
               **{k: s[k] for k in ("forgetting_near", "forgetting_far") if k in s}, "n": n,
               "curve_s": round(time.perf_counter() - t0, 4)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        return row
