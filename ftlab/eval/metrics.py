"""Gain and forgetting: one pure function over base and tuned scores. No torch, no I/O.

Accuracy-type scores are in points (0-100). A task's `improvement` is tuned - base when higher is better
and base - tuned otherwise, so that positive always means better.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

# A world run's forget task for pretraining skill s is named f"{SKILL_TASK}{s}" (ftlab.eval.suites, conf/eval/synth.yaml).
SKILL_TASK = "synth_"


def improvement(base: float, tuned: float, higher_is_better: bool) -> float:
    return (tuned - base) if higher_is_better else (base - tuned)


def summarize(tasks: Mapping[str, Mapping], target_skill: Optional[str] = None) -> dict:
    """Summary of a run from its task table.

    tasks: {name: {role: "target"|"forget", unit: "points"|..., higher_is_better, base, tuned}}.
    - gain: mean improvement over target tasks scored in points;
    - forgetting: mean worsening (base - tuned for accuracy) over forget tasks in points; > 0 means worse;
    - forgetting_max: the largest such worsening;
    - retention: mean of tuned/base x 100 over forget tasks in points with base > 0;
    - forget_ppl_change_pct: mean relative change of perplexity-type forget tasks (> 0 means worse).
    Tasks whose unit is not points (perplexity) stay out of the point means: their scale is not comparable.
    - forgetting_near / forgetting_far: only when `target_skill` is given (a world run's data.skill), see
      `forgetting_by_distance`.
    Values are None when no task qualifies.
    """
    target = [t for t in tasks.values() if t["role"] == "target" and t.get("unit", "points") == "points"]
    forget = [t for t in tasks.values() if t["role"] == "forget" and t.get("unit", "points") == "points"]
    other = [t for t in tasks.values() if t["role"] == "forget" and t.get("unit", "points") != "points"]

    gains = [improvement(t["base"], t["tuned"], t["higher_is_better"]) for t in target]
    drops = [-improvement(t["base"], t["tuned"], t["higher_is_better"]) for t in forget]
    kept = [100.0 * t["tuned"] / t["base"] for t in forget if t["higher_is_better"] and t["base"] > 0]
    ppl = [100.0 * -improvement(t["base"], t["tuned"], t["higher_is_better"]) / t["base"]
           for t in other if t["base"] and math.isfinite(t["base"])]
    out = {
        "gain": _mean(gains),
        "forgetting": _mean(drops),
        "forgetting_max": max(drops) if drops else None,
        "retention": _mean(kept),
        "forget_ppl_change_pct": _mean(ppl),
        "n_target": len(target),
        "n_forget": len(forget) + len(other),
    }
    if target_skill is not None:
        d = forgetting_by_distance(tasks, target_skill)
        out.update(forgetting_near=d["near"], forgetting_far=d["far"])
    return out


def forgetting_by_distance(tasks: Mapping[str, Mapping], target_skill: Optional[str],
                           neighbours: Optional[Mapping[str, tuple]] = None) -> dict:
    """Forgetting split by distance to a world target: {"near": mean drop (points, > 0 is worse) over the forget
    tasks of the pretraining skills that share structure with `target_skill`, "far": over the other pretraining
    skills' forget tasks, "n_near", "n_far": how many tasks each mean is over}.

    `neighbours` defaults to ftlab.world.skills.NEIGHBOURS. A side is None when it has no evaluated task; both are
    None when `target_skill` is not a world target (not a world run). Only forget tasks named synth_<pretraining
    skill> in points count: the target's own task, the held-out perplexity (synth_ppl) and other suites do not.
    """
    from ftlab.config.names import PRETRAIN_SKILLS

    if neighbours is None:
        from ftlab.world.skills import NEIGHBOURS as neighbours
    if target_skill not in neighbours:
        return {"near": None, "far": None, "n_near": 0, "n_far": 0}
    near = set(neighbours[target_skill])
    drops: dict[bool, list[float]] = {True: [], False: []}
    for name, t in tasks.items():
        skill = name[len(SKILL_TASK):] if name.startswith(SKILL_TASK) else None
        if (t["role"] != "forget" or t.get("unit", "points") != "points" or skill not in PRETRAIN_SKILLS
                or skill == target_skill):
            continue
        drops[skill in near].append(-improvement(t["base"], t["tuned"], t["higher_is_better"]))
    return {"near": _mean(drops[True]), "far": _mean(drops[False]), "n_near": len(drops[True]),
            "n_far": len(drops[False])}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def task_entry(role: str, metric: str, higher_is_better: bool, unit: str, base: float, tuned: float,
               n: int) -> dict:
    return {"role": role, "metric": metric, "higher_is_better": higher_is_better, "unit": unit,
            "base": base, "tuned": tuned, "delta": tuned - base, "n": n}


def chance_points(kind: str, metric: str, rows: list[dict]) -> float | None:
    """The score (points) of guessing uniformly: multiple choice 100/(choices), averaged over items; 0 for exact-match
    generation; None where chance is not a point score (perplexities, lm-eval metrics)."""
    if kind == "multiple_choice" and metric in ("acc", "acc_norm") and rows:
        return sum(100.0 / len(r.get("choices") or r.get("contexts")) for r in rows) / len(rows)
    if kind == "generation":
        return 0.0
    return None


def above_chance_retention(base: float, tuned: float, chance: float) -> float | None:
    """The share (%) of the base's above-chance ability that the tuned model keeps: (tuned - chance)/(base - chance);
    WinoGrande 60 -> 52 at chance 50 keeps 20 %, where tuned/base says 87 %. None when the base is at or below
    chance (nothing to keep)."""
    if base - chance <= 0:
        return None
    return 100.0 * (tuned - chance) / (base - chance)
