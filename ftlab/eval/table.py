"""result.json's task table: one entry per task from its base and tuned evaluation (a run's, a post-training
variant's, a merged model's), so every record that `ftlab report` reads has the same fields."""

from __future__ import annotations


def task_table(tasks, base: dict, tuned: dict) -> dict:
    """result.json `tasks` (or `validation.tasks`): per task its role, metric, base, tuned, delta, n, chance level,
    both sides' metrics and the task's meta. `base[name]` may lack `metrics`/`cached` (a base score read back from a
    record)."""
    from ftlab.eval.metrics import chance_points, task_entry

    out = {}
    for t in tasks:
        entry = {**task_entry(t.role, t.metric, t.higher_is_better, t.unit, base[t.name]["score"],
                              tuned[t.name]["score"], tuned[t.name]["n"]),
                 "metrics": {"base": base[t.name].get("metrics"), "tuned": tuned[t.name].get("metrics")},
                 "base_cached": base[t.name].get("cached"), **t.meta}
        chance = chance_points(t.kind, t.metric, t.rows)
        if chance is not None:
            entry["chance"] = chance
        out[t.name] = entry
    return out
