"""The `post` config group (weight-space transforms applied after training, each yielding evaluated *variants* of the
run) and the knobs of `ftlab merge`. Pure Python: the transforms themselves are ftlab.post.

Defaults and where they come from (docs/post.md has the full story):
- post=interp: alphas 0, 0.25, 0.5, 0.75, 1 (issue 16); theta = theta_base + alpha * (theta_tuned - theta_base).
- post=lines: LiNeS (Wang et al. 2024, arXiv:2410.17146), official code wang-kee/LiNeS src/eval/eval.py: block l of L
  gets alpha + beta * l / (L - 1) of its update, everything outside the blocks (embeddings, final norm, head) gets
  alpha; single-task editing searches alpha over 0.0..1.0 and sets beta = 1 - alpha (the last block keeps its whole
  update). beta null here means exactly that; the default alphas are a 4-point subset of that grid.
- merge: TIES (prateeky2806/ties-merging README: topk20, elect=mass, agg=dis-mean): density 0.2, sign `total`;
  DARE (yule-BUAA/MergeLM mask_weights_utils.py: Bernoulli drop of the delta, rescale by 1/(1-p)): drop 0.9 (the
  README's and the paper's headline "90%"), rescale on; Breadcrumbs (mergekit sparsify.magnitude_outliers):
  gamma 0.01 (mergekit's default), density 0.9 (ftlab's choice: neither the abstract nor mergekit fixes one);
  scale (lambda) 1.0 for every method that takes one (the official scripts search it on validation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ftlab.config.bounds import choice
from ftlab.config.registry import ConfigError

POST_KINDS = ("none", "interp", "lines")
# Methods whose export is not a weight delta the post transforms can scale: DoRA (a trained magnitude normalises
# the update, so scaling B@A does not scale the change), IA3 (multiplicative vectors), prompt tuning (no weights).
NO_WEIGHT_DELTA = {"dora": "its trained magnitude vector re-normalises the update",
                   "ia3": "its update is multiplicative (learned scaling vectors)",
                   "prompt_tuning": "it trains prompt embeddings, not model weights"}


@dataclass
class PostConfig:
    """Post-training variants of a run (config group `post`); not part of the run's identity, so adding a `post` to a
    completed run evaluates only the new variants."""

    kind: str = "none"  # none | interp | lines
    alphas: list[float] = field(default_factory=list)  # interp: the alphas; lines: the shallow-layer scales
    beta: Optional[float] = None  # lines: the extra scale of the deepest block; null: 1 - alpha (official)
    save: bool = False  # also save each variant as an HF model directory (safetensors) under variants/<name>/


def _number(key: str, x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ConfigError(f"{key}: must be a finite number, got {x!r}")
    return float(x)


def check_post(post: PostConfig, run: Optional[Any] = None) -> None:
    choice("post.kind", post.kind, POST_KINDS)
    if post.kind == "none":
        if post.alphas or post.beta is not None or post.save:
            raise ConfigError("post.alphas/beta/save: post=none evaluates no variants; pick post=interp or post=lines")
        return
    if not post.alphas:
        raise ConfigError(f"post.alphas: post={post.kind} needs at least one alpha, e.g. post.alphas=[0,0.5,1]")
    seen = [_number(f"post.alphas[{i}]", a) for i, a in enumerate(post.alphas)]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"post.alphas: each alpha once, got {post.alphas}")
    if post.kind == "interp" and post.beta is not None:
        raise ConfigError("post.beta: only post=lines reads it (interp scales every layer alike)")
    if post.beta is not None:
        _number("post.beta", post.beta)
    name = getattr(getattr(run, "method", None), "name", None)
    if name in NO_WEIGHT_DELTA:
        raise ConfigError(f"post: method={name} has no weight delta to scale ({NO_WEIGHT_DELTA[name]}); use "
                          "post=none, or a method whose export is a LoRA adapter or a whole model")


def variant_specs(post: PostConfig) -> list[dict]:
    """[{name, kind, params}] of the variants `post` asks for, in order; the name is stable for the same params (the
    record's key: a variant already in result.json is not evaluated again)."""
    out = []
    for a in post.alphas or []:
        a = float(a)
        if post.kind == "interp":
            out.append({"name": f"interp_a{a:g}", "kind": "interp", "params": {"alpha": a}})
        elif post.kind == "lines":
            b = 1.0 - a if post.beta is None else float(post.beta)
            out.append({"name": f"lines_a{a:g}_b{b:g}", "kind": "lines", "params": {"alpha": a, "beta": b}})
    return out


# --------------------------------------------------------------------------------------------------- merge
MERGE_METHODS = ("soup", "greedy_soup", "task_arithmetic", "ties", "dare", "breadcrumbs")
TIES_SIGNS = ("total", "frequency")  # peft's majority_sign_method names: sign of the sum | of the sum of signs


@dataclass
class MergeConfig:
    """`ftlab merge RUN_DIR... method=<name> [key=value ...]`."""

    method: str = "task_arithmetic"
    scale: float = 1.0  # lambda: theta = base + scale * merged delta (task_arithmetic, ties, dare, breadcrumbs)
    density: Optional[float] = None  # kept fraction: ties 0.2, breadcrumbs 0.9 when null
    sign: str = "total"  # ties sign election: total (sign of the summed trimmed deltas) | frequency (majority)
    drop: float = 0.9  # dare: drop probability of each delta entry
    rescale: bool = True  # dare: divide what is kept by 1 - drop (keeps the expectation)
    gamma: float = 0.01  # breadcrumbs: the largest-magnitude fraction masked as outliers
    lines_alpha: Optional[float] = None  # LiNeS on the merged delta (alpha, beta); null: off
    lines_beta: Optional[float] = None
    seed: int = 0  # dare's draws
    save: bool = False  # save the merged model as an HF model directory (model/ in the merged run directory)
    out_dir: Optional[str] = None  # null: $FTLAB_OUTPUTS (or ./outputs), like ftlab run
    name: Optional[str] = None  # the merged run directory's name; null: merge_<method>_<data>_s<seed>_<digest>

    def resolved_density(self) -> float:
        if self.density is not None:
            return float(self.density)
        return 0.2 if self.method == "ties" else 0.9


def check_merge(m: MergeConfig) -> None:
    choice("method", m.method, MERGE_METHODS)
    choice("sign", m.sign, TIES_SIGNS)
    _number("scale", m.scale)
    if m.density is not None:
        _number("density", m.density)
    d = m.resolved_density()
    if not 0 < d <= 1:
        raise ConfigError(f"density: must be in (0, 1], got {d!r}")
    if not 0 <= _number("drop", m.drop) < 1:
        raise ConfigError(f"drop: must be in [0, 1), got {m.drop!r}")
    if not 0 <= _number("gamma", m.gamma) < 1 or (m.method == "breadcrumbs" and m.gamma + d > 1):
        raise ConfigError(f"gamma: must be in [0, 1) with gamma + density <= 1, got gamma={m.gamma!r}, density={d!r}")
    if (m.lines_alpha is None) != (m.lines_beta is None):
        raise ConfigError("lines_alpha/lines_beta: give both (LiNeS on the merged delta) or neither")
    if m.lines_alpha is not None:
        if m.method in ("soup", "greedy_soup"):
            raise ConfigError(f"lines_alpha: LiNeS scales a merged task vector; method={m.method} averages weights "
                              "(use task_arithmetic, ties, dare or breadcrumbs)")
        _number("lines_alpha", m.lines_alpha)
        _number("lines_beta", m.lines_beta)


def missing_variants(post: PostConfig, record: dict, run_dir: Optional[str] = None) -> list[dict]:
    """The variants `post` asks for that a run's record (result.json) does not hold yet, or whose requested saved
    model directory (post.save) is not there."""
    import os

    have = {v.get("name") for v in record.get("variants") or []}
    out = []
    for s in variant_specs(post):
        saved = run_dir is None or not post.save or os.path.isdir(os.path.join(run_dir, "variants", s["name"]))
        if s["name"] not in have or not saved:
            out.append(s)
    return out
