"""Weight-space diagnostics of a fine-tune: pure functions over base and tuned weights (no data, no training).

- **Intruder dimensions** (Shuttleworth et al., *LoRA vs Full Fine-tuning: An Illusion of Equivalence*): for a
  matrix W, take the top-k singular vectors of the tuned W'; one is an *intruder* when its largest |cosine|
  with every singular vector of the base W is below ε. Counted per matrix for a grid of k and ε.
- **Update profile**: per matrix, the relative update norm ‖ΔW‖_F / ‖W‖_F (ΔW = W' − W), the effective rank
  of ΔW (exp of the entropy of its normalised singular values; Roy & Vetterli 2007), the rank that explains
  90% of ΔW's energy Σσ² (the spectral analysis of Biderman et al. 2024), and the fraction of entries changed.

Inputs are state dicts ``{name: tensor}`` of the same model (a tuned PEFT model is read through
`effective_weights`, which merges its adapters into a copy). Only 2-D weights are analysed (``*.weight`` of
linear layers; embeddings and the head are left out unless `include` names them). Names like
``model.layers.3.self_attn.q_proj.weight`` give ``layer=3, module="q_proj"``.

    base = effective_weights(base_model)                 # before training (a snapshot on the CPU)
    report = weight_report(base, effective_weights(tuned_model))
    report["summary"]; report["matrices"]               # totals / one row per matrix

- **TuCo** (Nuti et al., *TuCo: Measuring the Contribution of Fine-Tuning to Individual Responses of LLMs*,
  ICML 2025), activation space: run the tuned model; at each decoder layer l with input x_l, the pre-training
  component is PTC_l = f_base,l(x_l) − x_l and the fine-tuning component FTC_l = f_tuned,l(x_l) − f_base,l(x_l)
  (so x_{l+1} = x_l + PTC_l + FTC_l exactly). Summed over layers at the last prompt token,
  TuCo = ‖ΣFTC‖ / (‖ΣPTC‖ + ‖ΣFTC‖) ∈ [0, 1] (`tuning_contribution`).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Iterable, Mapping, Optional, Sequence

import torch

from ftlab.config.names import DIAGNOSTICS  # what eval.diagnostics may list
from ftlab.models.structure import decoder_layers, eval_mode, model_device, pad_id
from ftlab.utils.padding import right_pad

__all__ = ["intruder_dimensions", "update_profile", "effective_rank", "energy_rank", "weight_report",
           "effective_weights", "parse_name", "tuning_contribution", "tuco_prompts", "diagnose_run",
           "DIAGNOSTICS", "DEFAULT_KS", "DEFAULT_EPSILONS"]

DEFAULT_KS = (10, 50)
DEFAULT_EPSILONS = (0.5, 0.6, 0.7, 0.8, 0.9)
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.+?)(?:\.weight)?$")
_SKIP = ("embed", "lm_head", "wte", "wpe", "norm")


def _svd(w: torch.Tensor):
    return torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)


def intruder_dimensions(w_base: torch.Tensor, w_tuned: torch.Tensor, ks: Sequence[int] = DEFAULT_KS,
                        epsilons: Sequence[float] = DEFAULT_EPSILONS, side: str = "left") -> dict:
    """Intruder dimensions of one matrix.

    Args:
        w_base, w_tuned: the matrix before and after fine-tuning (same shape).
        ks: how many of the tuned matrix's top singular vectors to test.
        epsilons: thresholds on the largest |cosine| with any base singular vector.
        side: "left" (columns of U, the output space; the paper's choice) or "right" (rows of Vᵀ).

    Returns:
        ``{"counts": {(k, eps): n}, "max_cos": [..top max(ks)..], "sigma": [..top max(ks)..],
        "intruders": [{"rank", "sigma", "max_cos"} for each vector below min(epsilons) among the top max(ks)]}``;
        ranks are 0-based positions in the tuned spectrum.
    """
    if w_base.shape != w_tuned.shape:
        raise ValueError(f"intruder_dimensions: shapes differ {tuple(w_base.shape)} vs {tuple(w_tuned.shape)}")
    if side not in ("left", "right"):
        raise ValueError(f"intruder_dimensions: side must be 'left' or 'right', got {side!r}")
    ub, _, vbh = _svd(w_base)
    ut, st, vth = _svd(w_tuned)
    kmax = min(max(ks), st.numel())
    if side == "left":
        top, basis = ut[:, :kmax], ub
    else:
        top, basis = vth[:kmax].T, vbh.T
    max_cos = (top.T @ basis).abs().amax(dim=1)  # [kmax]: the best match of each tuned vector in the base basis
    counts = {(k, eps): int((max_cos[:min(k, kmax)] < eps).sum()) for k in ks for eps in epsilons}
    low = min(epsilons)
    intruders = [{"rank": i, "sigma": float(st[i]), "max_cos": float(max_cos[i])}
                 for i in range(kmax) if max_cos[i] < low]
    return {"counts": counts, "max_cos": max_cos.tolist(), "sigma": st[:kmax].tolist(), "intruders": intruders}


def effective_rank(sigma: torch.Tensor) -> float:
    """exp(entropy) of the singular values normalised to sum 1 (1 for a rank-1 matrix, r for r equal values)."""
    s = sigma.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def energy_rank(sigma: torch.Tensor, fraction: float = 0.9) -> int:
    """The fewest singular values whose squares hold `fraction` of Σσ² (0 for a zero matrix)."""
    e = sigma.double().pow(2)
    total = e.sum()
    if total <= 0:
        return 0
    cum = e.cumsum(0) / total
    return int((cum < fraction - 1e-12).sum()) + 1


def update_profile(w_base: torch.Tensor, w_tuned: torch.Tensor) -> dict:
    """‖ΔW‖_F/‖W‖_F, effective rank and 90%-energy rank of ΔW, and the fraction of entries that changed."""
    if w_base.shape != w_tuned.shape:
        raise ValueError(f"update_profile: shapes differ {tuple(w_base.shape)} vs {tuple(w_tuned.shape)}")
    wb, wt = w_base.detach().double(), w_tuned.detach().double()
    delta = wt - wb
    base_norm = float(torch.linalg.norm(wb))
    dnorm = float(torch.linalg.norm(delta))
    sigma = torch.linalg.svdvals(delta) if dnorm > 0 else torch.zeros(1, dtype=torch.float64)
    return {"rel_update": dnorm / base_norm if base_norm > 0 else math.inf if dnorm > 0 else 0.0,
            "update_norm": dnorm, "base_norm": base_norm, "erank": effective_rank(sigma),
            "rank90": energy_rank(sigma, 0.9), "changed_frac": float((delta != 0).double().mean())}


def parse_name(name: str) -> tuple[Optional[int], str]:
    """(layer index or None, module name) of a parameter name."""
    m = _LAYER.search(name)
    if m:
        return int(m.group(1)), m.group(2).split(".")[-1]
    return None, name.removesuffix(".weight").split(".")[-1]


def _selected(name: str, t: torch.Tensor, include: Optional[Iterable[str]]) -> bool:
    if t.ndim != 2 or not name.endswith("weight"):
        return False
    if include is not None:
        return any(p in name for p in include)
    return not any(p in name for p in _SKIP)


def weight_report(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor],
                  ks: Sequence[int] = DEFAULT_KS, epsilons: Sequence[float] = DEFAULT_EPSILONS,
                  include: Optional[Iterable[str]] = None, only_changed: bool = True, side: str = "left",
                  intruders: bool = True) -> dict:
    """Intruder dimensions and update profile of every 2-D weight present in both state dicts.

    Args:
        include: substrings of the names to analyse (default: every 2-D ``*weight`` except embeddings, the
            head and norms).
        only_changed: skip matrices the fine-tune left exactly unchanged (their SVDs cost time and say nothing).
        intruders: False skips the intruder search (two full SVDs per matrix): the update profile only.

    Returns:
        ``{"matrices": [{name, layer, module, shape, rel_update, update_norm, base_norm, erank, rank90,
        changed_frac, intruders: {"k10_eps0.5": n, ...}, intruder_list}], "summary": {...}}``. The summary has
        ``n_matrices``, ``n_changed``, ``intruders`` (totals per k/ε key), ``rel_update_mean``,
        ``erank_mean``, ``rank90_mean``, and ``by_module`` / ``by_layer`` means of rel_update and intruder
        totals at the first k and ε.
    """
    rows, seen = [], 0
    for name, wb in base.items():
        wt = tuned.get(name)
        if wt is None or not _selected(name, wb, include) or wt.shape != wb.shape:
            continue
        seen += 1
        changed = not torch.equal(wb.detach().cpu(), wt.detach().cpu())
        if only_changed and not changed:
            continue
        layer, module = parse_name(name)
        prof = update_profile(wb, wt)
        row = {"name": name, "layer": layer, "module": module, "shape": list(wb.shape), **prof}
        if intruders:
            intr = intruder_dimensions(wb, wt, ks, epsilons, side=side)
            row.update(intruders={_key(k, e): n for (k, e), n in intr["counts"].items()},
                       intruder_list=intr["intruders"])
        rows.append(row)
    summary = summarize_report(rows, ks if intruders else (), epsilons, n_seen=seen)
    if not intruders:
        summary.pop("intruders")
    return {"matrices": rows, "summary": summary}


def _key(k: int, eps: float) -> str:
    return f"k{k}_eps{eps:g}"


def summarize_report(rows: list[dict], ks: Sequence[int] = DEFAULT_KS,
                     epsilons: Sequence[float] = DEFAULT_EPSILONS, n_seen: Optional[int] = None) -> dict:
    def mean(xs):
        xs = [x for x in xs if x is not None and math.isfinite(x)]
        return sum(xs) / len(xs) if xs else None

    keys = [_key(k, e) for k in ks for e in epsilons]
    main = keys[0] if keys else None
    by_module: dict[str, dict] = {}
    by_layer: dict[str, dict] = {}
    for group, field in ((by_module, "module"), (by_layer, "layer")):
        for r in rows:
            g = group.setdefault(str(r[field]), {"n": 0, "rel_update": [], "intruders": 0})
            g["n"] += 1
            g["rel_update"].append(r["rel_update"])
            g["intruders"] += r["intruders"].get(main, 0) if main else 0
        if main is None:
            for g in group.values():
                g.pop("intruders")
        for g in group.values():
            g["rel_update"] = mean(g["rel_update"])
    return {"n_matrices": n_seen if n_seen is not None else len(rows),
            "n_changed": sum(r["changed_frac"] > 0 for r in rows),
            "intruders": {k: sum(r["intruders"].get(k, 0) for r in rows) for k in keys},
            "rel_update_mean": mean([r["rel_update"] for r in rows]),
            "erank_mean": mean([r["erank"] for r in rows]), "rank90_mean": mean([r["rank90"] for r in rows]),
            "by_module": by_module, "by_layer": by_layer, "main_key": main}


def effective_weights(model, include: Optional[Iterable[str]] = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The 2-D weights the model computes with, as a detached state dict on `device`, under the base model's
    names. A PEFT model is merged on a deep copy first (the model itself is untouched), so a LoRA/DoRA/IA3
    fine-tune is compared as W + ΔW. Take it from the base model *before* training for the base side."""
    m = model
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        m = copy.deepcopy(model).merge_and_unload()
    out = {}
    for name, t in m.state_dict().items():
        if _selected(name, t, include):
            out[name] = t.detach().to(device=device, copy=True)
    return out


# ---------------------------------------------------------------------------------------------------- TuCo
def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def tuning_contribution(tuned_model, tokenizer, prompts: Sequence[str], base_model=None,
                        batch_size: int = 8, return_vectors: bool = False,
                        max_length: Optional[int] = None) -> list[dict]:
    """TuCo of each prompt (see the module doc), at its last token.

    Args:
        tuned_model: the fine-tuned model (a PEFT model is fine).
        base_model: the pre-trained model with the same architecture; None for a PEFT model, whose base is its
            own layers with the adapters disabled (right for LoRA; not for PiSSA-like inits, which change the
            frozen weights: give the base then).
        max_length: keep the last max_length tokens of each prompt (None: all): TuCo is measured at the last
            prompt token, where the model answers, so a long prompt loses its beginning (as lm-eval cuts
            contexts), never the token TuCo is read at.

    Returns:
        One dict per prompt: ``{"tuco", "ftc_norm", "ptc_norm"}`` (and with return_vectors the summed
        components ``"ftc"``, ``"ptc"`` and the first layer's input ``"x0"`` at the last token, as tensors).
    """
    layers_ft = list(decoder_layers(tuned_model)[1])
    if base_model is None:
        if not hasattr(tuned_model, "disable_adapter"):
            raise ValueError("tuning_contribution: give base_model (the tuned model is not a PEFT model)")
        layers_pt, disable = layers_ft, tuned_model.disable_adapter
    else:
        layers_pt, disable = list(decoder_layers(base_model)[1]), None
        if len(layers_pt) != len(layers_ft):
            raise ValueError("tuning_contribution: base and tuned models have different numbers of layers")
    device, pad = model_device(tuned_model), pad_id(tokenizer)
    calls: list[tuple] = []

    def pre_hook(module, args, kwargs):
        calls.append((module, args, dict(kwargs)))

    out: list[dict] = []
    with eval_mode(tuned_model):
        handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers_ft]
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start:start + batch_size])
                enc = tokenizer(chunk, add_special_tokens=True)["input_ids"]
                if max_length:
                    enc = [e[-max_length:] for e in enc]
                ids, mask = right_pad(enc, pad)  # right padding: causal attention keeps real tokens unaffected
                last = torch.tensor([len(e) - 1 for e in enc], device=device)
                rows = torch.arange(len(enc), device=device)
                calls.clear()
                tuned_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                ftc = ptc = x0 = 0
                for k, (module, args, kwargs) in enumerate(calls[:len(layers_ft)]):
                    x = args[0] if args else kwargs["hidden_states"]
                    if k == 0:
                        x0 = x[rows, last].double()
                    y_ft = _hidden(module(*args, **kwargs))
                    if disable is not None:
                        with disable():
                            y_pt = _hidden(module(*args, **kwargs))
                    else:
                        y_pt = _hidden(layers_pt[k](*args, **kwargs))
                    x_last, ft_last, pt_last = x[rows, last], y_ft[rows, last], y_pt[rows, last]
                    ptc = ptc + (pt_last - x_last).double()
                    ftc = ftc + (ft_last - pt_last).double()
                for f, p, x in zip(ftc, ptc, x0):
                    fn, pn = float(f.norm()), float(p.norm())
                    out.append({"tuco": fn / (fn + pn) if fn + pn > 0 else 0.0, "ftc_norm": fn, "ptc_norm": pn})
                    if return_vectors:
                        out[-1].update(ftc=f.cpu(), ptc=p.cpu(), x0=x.cpu())
        finally:
            for h in handles:
                h.remove()
    return out


# ------------------------------------------------------------------------------------------------ in a run

# What the numbers mean (none of them is "better" on its own; they explain gain and forgetting).
MEANING = {
    "intruders": "count of top-k tuned singular vectors with max |cos| to every base singular vector < eps; "
                 "more = more new directions in the weights (full fine-tuning: few; LoRA: some)",
    "rel_update_mean": "mean over changed matrices of ||dW||_F / ||W||_F; larger = further from the base",
    "erank_mean": "mean effective rank of dW (exp entropy of its normalised singular values)",
    "rank90_mean": "mean number of singular values of dW holding 90% of its energy",
    "tuco": "per prompt ||sum FTC|| / (||sum PTC|| + ||sum FTC||) at the last token, in [0, 1]; 0 = the base's "
            "computation, higher = more of the hidden-state update comes from fine-tuning",
}


def tuco_prompts(task, tokenizer, n: int) -> list[tuple[str, str]]:
    """Up to n (id, prompt) pairs of an ftlab.eval.task.Task: what the model reads before it answers
    (generation: the prompt; multiple choice: the first context; perplexity: the context, else the text)."""
    from ftlab.eval.prompts import apply_format

    out = []
    for r in task.rows[:n]:
        if "prompt" in r:
            text = r["prompt"]
        elif "contexts" in r:
            text = r["contexts"][0]
        else:
            text = r.get("context") or r.get("text") or ""
        if text:
            out.append((r["id"], apply_format(tokenizer, text, task.format) if task.format != "plain" else text))
    return out


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0, "mean": None, "median": None, "p90": None}
    s = sorted(xs)
    return {"n": len(s), "mean": sum(s) / len(s), "median": s[len(s) // 2] if len(s) % 2 else
            (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2, "p90": s[min(len(s) - 1, int(0.9 * len(s)))]}


def diagnose_run(tuned, base, tokenizer, tasks, out_dir, which: Sequence[str] = DIAGNOSTICS, n_prompts: int = 64,
                 batch_size: int = 16, max_length: Optional[int] = 256) -> dict:
    """The diagnostics of one run, base vs tuned: `which` of intruder, update (ftlab weight report on the
    merged weights) and tuco (on up to `n_prompts` target and `n_prompts` forgetting prompts, spread over the
    tasks of each role). Full tables go to `out_dir` (weights.json, tuco.jsonl); returns the summary for
    result.json's `diagnostics` section.

    `base` is the pre-trained model itself (the pipeline reloads it), so every method is compared with the same
    W: a PEFT model is merged for its ΔW, and TuCo's pre-training component runs the base's own layers (right
    for PiSSA/OLoRA/CorDA too, whose frozen residual is not W)."""
    import json
    import time
    from pathlib import Path

    from ftlab.utils.files import atomic_write_json, write_jsonl

    unknown = [w for w in which if w not in DIAGNOSTICS]
    if unknown:
        raise ValueError(f"eval.diagnostics: unknown {unknown}; valid: {', '.join(DIAGNOSTICS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"which": list(which), "files": {}, "meaning": {}}
    t0 = time.perf_counter()
    if "intruder" in which or "update" in which:
        report = weight_report(effective_weights(base), effective_weights(tuned), intruders="intruder" in which)
        atomic_write_json(out_dir / "weights.json", report)
        summary["weights"] = report["summary"]
        summary["files"]["weights"] = str(Path(out_dir.name) / "weights.json")
        summary["meaning"].update({k: MEANING[k] for k in MEANING if k in report["summary"]})
        summary["weights_s"] = time.perf_counter() - t0
    if "tuco" in which:
        t1 = time.perf_counter()
        cfg = getattr(tuned, "active_peft_config", None)
        if getattr(cfg, "is_prompt_learning", False):
            # virtual tokens change the input, not the layers: the per-layer decomposition does not apply
            summary["tuco"] = {"skipped": "prompt-learning method: the layers are unchanged, TuCo is 0 by "
                                          "construction; its effect is in the input"}
        else:
            rows = []
            for role in ("target", "forget"):
                role_tasks = [t for t in tasks if t.role == role]
                per = -(-n_prompts // len(role_tasks)) if role_tasks else 0
                picked = [(t, i, p) for t in role_tasks for i, p in tuco_prompts(t, tokenizer, per)][:n_prompts]
                if not picked:
                    continue
                vals = tuning_contribution(tuned, tokenizer, [p for _, _, p in picked], base_model=base,
                                           batch_size=batch_size, max_length=max_length)
                rows += [{"role": role, "task": t.name, "id": i, **v} for (t, i, _), v in zip(picked, vals)]
            write_jsonl(out_dir / "tuco.jsonl", rows)
            tuco = {role: _stats([r["tuco"] for r in rows if r["role"] == role]) for role in ("target", "forget")}
            tuco["by_task"] = {name: _stats([r["tuco"] for r in rows if r["task"] == name])["mean"]
                               for name in dict.fromkeys(r["task"] for r in rows)}
            summary["tuco"] = tuco
            summary["files"]["tuco"] = str(Path(out_dir.name) / "tuco.jsonl")
        summary["meaning"]["tuco"] = MEANING["tuco"]
        summary["tuco_s"] = time.perf_counter() - t1
    summary["wall_s"] = time.perf_counter() - t0
    json.dumps(summary)  # fail here, not in result.json, on anything not JSON-able
    return summary
