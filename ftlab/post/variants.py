"""Post-training variants of one run (config group `post`): interpolation toward the base and LiNeS, each evaluated on
the run's tasks and recorded in result.json `variants` with per-item records under records/variant_<name>/.

One model is evaluated, its weights set per variant:
- a whole-model export: the base architecture holds theta = lerp(theta_base, theta_tuned, factor) per parameter;
  theta_base is kept once (the one extra copy), theta_tuned is read tensor by tensor from checkpoints/final.
  torch.lerp returns the start exactly at 0 and the end exactly at 1, so alpha=0 is the base and alpha=1 the tuned
  model bit for bit;
- a LoRA adapter: the adapter is loaded onto the base and each LoRA layer's scaling is multiplied by its factor, i.e.
  the adapter's delta B @ A * s is scaled (0: the base exactly, 1: the tuned model exactly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from ftlab.post.formulas import lines_factor
from ftlab.post.weights import RunWeights, block_index


class ScaledModel:
    """The one model the variants of a run are evaluated on (see the module docstring)."""

    def __init__(self, model_cfg, tok, run_dir: Path, device: str):
        from ftlab.models.loading import load_model
        from ftlab.models.structure import decoder_layers

        self.weights = RunWeights(run_dir)
        model = load_model(model_cfg, tok, device=device)
        if self.weights.kind == "adapter":
            from peft import PeftModel
            from peft.tuners.lora import LoraLayer

            model = PeftModel.from_pretrained(model, str(self.weights.dir), is_trainable=False)
            model.eval()
            self._lora = [(name, mod, a, mod.scaling[a]) for name, mod in model.named_modules()
                          if isinstance(mod, LoraLayer) for a in mod.scaling]
        else:
            params = dict(model.named_parameters())
            self.weights.check_fits(set(params))
            self._base = {n: p.detach().clone() for n, p in params.items() if n in self.weights.names}
        self.model = model
        self.prefix, layers = decoder_layers(model)
        self.n_blocks = len(layers)

    def set(self, factor: Callable[[Optional[int]], float]) -> None:
        """Every update scaled by factor(block index or None outside the blocks)."""
        if self.weights.kind == "adapter":
            for name, mod, adapter, s0 in self._lora:
                mod.scaling[adapter] = s0 * factor(block_index(name, self.prefix))
            return
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in self._base:
                    base = self._base[n]
                    tuned = self.weights.tuned(n, base.cpu()).to(base.device)
                    p.copy_(torch.lerp(base, tuned, float(factor(block_index(n, self.prefix)))))

    def save(self, out_dir: Path, tok) -> None:
        """The current weights as an HF model directory (safetensors; the base's tensor names and dtypes)."""
        from ftlab.utils.files import atomic_dir

        with atomic_dir(Path(out_dir)) as tmp:
            if self.weights.kind == "adapter":
                base = self.model.get_base_model()
                base.save_pretrained(tmp, state_dict=folded_state_dict(base), safe_serialization=True)
            else:
                self.model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)


def folded_state_dict(base) -> dict:
    """A peft-injected model's state dict in the plain model's names, each LoRA layer's current delta (its scaling
    included) added to its base weight; the adapter itself stays untouched (no merge/unmerge round trip)."""
    from peft.tuners.lora import LoraLayer

    sd = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        for name, mod in base.named_modules():
            if isinstance(mod, LoraLayer):
                w = sd[f"{name}.weight"]
                delta = sum(mod.get_delta_weight(a).float() for a in mod.scaling)
                sd[f"{name}.weight"] = (w.float() + delta).to(w.dtype)
    return sd


def factor_of(spec: dict, n_blocks: int) -> Callable[[Optional[int]], float]:
    p = spec["params"]
    if spec["kind"] == "interp":
        return lambda block: p["alpha"]
    return lambda block: lines_factor(block, n_blocks, p["alpha"], p["beta"])


def variant_entry(spec: dict, tasks, base: dict, scores: dict) -> dict:
    from ftlab.eval.metrics import summarize
    from ftlab.eval.table import task_table

    table = task_table(tasks, base, scores)
    summary = summarize(table)
    return {**spec, "gain": summary["gain"], "forgetting": summary["forgetting"], "summary": summary,
            "tasks": table, "records": f"records/variant_{spec['name']}"}


def evaluate_variants(cfg, run_dir: Path, record, tok, tasks: list, base: dict, device: str, *,
                      val_tasks: list = (), val_base: Optional[dict] = None, progress: bool = False) -> list[dict]:
    """Evaluate the variants cfg.post asks for that `record` (the run's RunRecord) lacks; each is added to
    result.json `variants` as soon as it is scored. Returns the entries evaluated now."""
    from ftlab.config.post import missing_variants
    from ftlab.eval.evaluate import evaluate

    todo = missing_variants(cfg.post, record.data, str(run_dir))
    if not todo:
        return []
    scaled = ScaledModel(cfg.model, tok, run_dir, device)
    out = []
    for spec in todo:
        name = spec["name"]
        scaled.set(factor_of(spec, scaled.n_blocks))
        scores = evaluate(scaled.model, tok, tasks, cfg.eval.batch_size, stage=f"variant_{name}", run_dir=run_dir,
                          progress=progress)
        entry = variant_entry(spec, tasks, base, scores)
        if val_tasks:
            from ftlab.eval.metrics import summarize
            from ftlab.eval.table import task_table

            vs = evaluate(scaled.model, tok, list(val_tasks), cfg.eval.batch_size, stage=f"validation_variant_{name}",
                          run_dir=run_dir, progress=progress)
            vt = task_table(val_tasks, val_base, vs)
            entry["validation"] = {"tasks": vt, "summary": summarize(vt)}
        if cfg.post.save:
            scaled.save(Path(run_dir) / "variants" / name, tok)
            entry["saved"] = f"variants/{name}"
        kept = [v for v in record.data.get("variants") or [] if v.get("name") != name]
        record.update(variants=kept + [entry])
        out.append(entry)
    return out
