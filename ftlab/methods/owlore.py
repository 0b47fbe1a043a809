"""OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection (Li et al., 2024, arXiv:2405.18380).

LISA (ftlab.methods.lisa) with two changes, as in the official code (pixeli99/OwLore):

- Sampling: block l is drawn with probability p_l = D_l / sum D, D_l its outlier ratio after OWL (Yin et al.,
  2024, arXiv:2310.05175; luuyin/OWL lib/prune_all.py): every linear of the block scores its entries
  A_ij = |W_ij| * ||X_j||_2 (X_j: input feature j over the calibration tokens, lib/layerwrapper.py `scaler_row`),
  the scores of all the block's linears are pooled, and D_l is the share of entries with A_ij > M * mean(A)
  (`check_outlier_mean`, mean over the whole layer). OwLore reads these ratios from a file computed once
  (finetuner.py: metric_cache/llama2_ratio_13.txt) and normalises them to probabilities; ftlab computes them at
  `prepare` from `calib_samples` calibration rows run through the base.
  Calibration rows (`calib_source`): `general` (the default when the data config has any) = the run's general rows
  (ftlab.data.sources.general_rows: `data.mix_source`, else the replay of the tiny world's pretraining skills),
  because the score describes the pretrained model, and OWL calibrates on pretraining text (C4, 128 samples);
  `task` = the run's training rows (the fallback when there is no general source; `train.method.calib` says
  which was used). When every ratio is 0 (M too high for the model) the draw is uniform, said in
  `train.method.sampling`. Blocks with ratio 0 are drawn only when fewer than `gamma` blocks have a positive ratio.
- Low-rank gradient projection: the 2-D weights of the blocks train with GaLore's AdamW (`galore_torch`,
  projected moments of rank `galore_rank`, projection refreshed every `galore_update_proj_gap` steps) when that
  package is importable; otherwise plain AdamW, said on stderr and in result.json (`train.method.galore: false`
  with the reason). Embeddings, head and norms always use plain Adam moments. The official code hard-codes rank
  256 for Llama-2-7B (hidden 4096) with update_proj_gap 100 and scale 1.0; ftlab's `galore_rank: null` scales that
  with the width, rank = max(1, round(256 * hidden_size / 4096)) = hidden_size / 16 (4 on the tiny world's 64).
  The official scripts re-sample every 50 steps (owlore_scripts/run_owlore_low_rank.sh: --lisa_interval_steps 50).

As in LISA, the optimizer state of de-activated blocks is released (a re-activated block starts afresh, GaLore
projection included); the official code keeps the stale moments (HF Trainer never drops them).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ftlab.config.bounds import at_least, choice
from ftlab.config.registry import ConfigError
from ftlab.methods.base import METHODS, MethodContext
from ftlab.methods.lisa import Lisa, LisaConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

OWL_CALIB_SOURCES = ("general", "task")
GALORE_RANK_AT_4096 = 256  # the official rank (finetuner.py `rank = 256`) at Llama-2-7B's width


@dataclass
class OwLoreConfig(LisaConfig):
    """OwLore: LISA sampling weighted by each block's OWL outlier ratio; GaLore low-rank moments when installed."""

    name: str = "owlore"
    interval: int = 50  # steps between re-samplings (the official scripts' --lisa_interval_steps 50)
    outlier_m: float = 13.0  # M: an entry is an outlier when its score |W_ij|*||X_j|| > M * the layer's mean score
    # calibration rows for ||X_j||: null = general when the data config has a source of general rows, else task
    calib_source: Optional[str] = None
    calib_samples: int = 128  # rows run through the base for ||X_j|| (OWL's nsamples 128)
    galore: bool = True  # GaLore projection for the sampled blocks' matrices when galore_torch imports
    galore_rank: Optional[int] = None  # null: max(1, round(256 * hidden_size / 4096)), the official 256 at 4096
    galore_update_proj_gap: int = 100  # steps between refreshes of the projection (SVD of the gradient)
    galore_scale: float = 1.0

    def check(self) -> None:
        super().check()
        if not self.outlier_m > 0:
            raise ConfigError(f"method.outlier_m: must be > 0, got {self.outlier_m!r}")
        if self.calib_source is not None:
            choice("method.calib_source", self.calib_source, OWL_CALIB_SOURCES)
        at_least("method.calib_samples", self.calib_samples, 1)
        at_least("method.galore_rank", self.galore_rank, 1, allow_none=True)
        at_least("method.galore_update_proj_gap", self.galore_update_proj_gap, 1)
        if not self.galore_scale > 0:
            raise ConfigError(f"method.galore_scale: must be > 0, got {self.galore_scale!r}")

    def check_run(self, run) -> None:
        """Across groups: calib_source=general needs a source of general rows in the data config."""
        d = run.data
        if self.calib_source == "general" and d.mix_source is None and not (d.source == "synth" and d.mix_skills):
            raise ConfigError("method.calib_source: general needs general rows: set data.mix_source=FILE.jsonl or a "
                              "hub dataset id of general text (used for calibration even with data.mix=0), or "
                              "method.calib_source=task (the run's training rows)")


def galore_rank_for(hidden_size: int) -> int:
    """The official rank 256 at width 4096, scaled linearly with the model's width."""
    return max(1, round(GALORE_RANK_AT_4096 * hidden_size / 4096))


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """OWL's layer outlier ratio: the share of the pooled entries of `scores` (one |W|*||X|| matrix per linear of
    the layer) above m times their mean (the mean over the whole layer, not per matrix)."""
    import torch

    a = torch.cat([s.reshape(-1).float() for s in scores])
    return float((a > m * a.mean()).sum()) / a.numel() if a.numel() else 0.0


def input_norms(model: nn.Module, rows: list[dict], pad: int, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """{qualified name: ||X_j||_2 per input feature j} of every nn.Linear inside the transformer blocks, over the
    non-padding tokens of `rows` (encoded rows, run through `model` without gradients)."""
    import torch
    from torch import nn

    from ftlab.models.structure import decoder_layers, eval_mode, model_device
    from ftlab.train.batches import collate

    prefix, layers = decoder_layers(model)
    sums: dict[str, torch.Tensor] = {}
    mask_box: list[torch.Tensor] = []

    def hook(name: str):
        def record(_module, inputs, _output):
            x = inputs[0].detach().float()
            keep = mask_box[0].reshape(-1).bool()
            sq = x.reshape(-1, x.shape[-1])[keep].pow(2).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq
        return record

    handles = [m.register_forward_hook(hook(f"{prefix}.{i}.{n}"))
               for i, layer in enumerate(layers) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    device = model_device(model)
    try:
        with eval_mode(model), torch.no_grad():
            for k in range(0, len(rows), batch_size):
                batch = collate(rows[k:k + batch_size], pad)
                mask_box[:] = [batch["attention_mask"].to(device)]
                model(input_ids=batch["input_ids"].to(device), attention_mask=mask_box[0])
    finally:
        for h in handles:
            h.remove()
    return {n: s.sqrt() for n, s in sums.items()}


def owl_ratios(model: nn.Module, norms: dict[str, torch.Tensor], m: float) -> list[float]:
    """D_l of every block: |W_ij| * ||X_j|| of all its linears, pooled (`outlier_ratio`)."""
    import torch
    from torch import nn

    from ftlab.models.structure import decoder_layers

    prefix, layers = decoder_layers(model)
    out = []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            scores = [mod.weight.detach().float().abs() * norms[f"{prefix}.{i}.{n}"].to(mod.weight.device)[None, :]
                      for n, mod in layer.named_modules() if isinstance(mod, nn.Linear)]
            out.append(outlier_ratio(scores, m))
    return out


def galore_unavailable() -> str | None:
    """None when `galore_torch` imports; otherwise why not."""
    try:
        import galore_torch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or its own imports failing (bitsandbytes)
        return f"galore_torch is not importable ({type(e).__name__}: {e})"
    return None


@METHODS.register("owlore", config=OwLoreConfig)
class OwLore(Lisa):
    name = "owlore"

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        from ftlab.models.structure import pad_id

        rows, self.calib = self.calibration_rows(ctx)
        norms = input_norms(model, rows, pad_id(ctx.tokenizer))
        self.ratios = owl_ratios(model, norms, self.cfg.outlier_m)
        total = sum(self.ratios)
        self.uniform = total == 0
        n = len(self.ratios)
        self.probs = [1 / n] * n if self.uniform else [r / total for r in self.ratios]
        self.galore_rank = self.cfg.galore_rank or galore_rank_for(model.config.hidden_size)
        self.galore_why_not = galore_unavailable() if self.cfg.galore else "method.galore=false"
        self.use_galore = self.galore_why_not is None
        if self.cfg.galore and not self.use_galore:
            print(f"ftlab: owlore: {self.galore_why_not}; the sampled blocks train with plain AdamW (full-rank "
                  "moments), not GaLore's low-rank projection. pip install galore-torch to get it.", file=sys.stderr)
        model = super().prepare(model, ctx)
        self._by_name = dict(model.named_parameters())
        return model

    def calibration_rows(self, ctx: MethodContext) -> tuple[list[dict], dict]:
        """`calib_samples` encoded rows for ||X_j|| and a record of where they came from."""
        from ftlab.train.batches import encode_example

        n, data = self.cfg.calib_samples, getattr(ctx, "data", None)
        has_general = data is not None and (getattr(data, "mix_source", None) is not None
                                            or bool(getattr(data, "mix_skills", None)))
        src = self.cfg.calib_source or ("general" if has_general else "task")
        if src == "general":
            if not has_general:
                raise ValueError("method owlore: calib_source=general needs general rows in the data config "
                                 "(data.mix_source, or data.mix_skills for synthetic data); or set "
                                 "method.calib_source=task")
            from ftlab.data.sources import general_rows

            raw = general_rows(data, n, ctx.seed)
            rows = [encode_example(ctx.tokenizer, r["prompt"], r["response"], ctx.max_length) for r in raw]
            what = (f"data.mix_source={data.mix_source}" if getattr(data, "mix_source", None) is not None
                    else f"replay of the pretraining skills {list(data.mix_skills)}")
        else:
            rows = ctx.calibration_rows(n)
            what = "the run's training rows"
        return rows, {"source": src, "rows": len(rows), "tokens": sum(len(r["input_ids"]) for r in rows),
                      "from": what}

    def draw(self) -> list[int]:
        """`gamma` blocks without replacement, each draw proportional to the outlier ratio of those left."""
        left = list(range(len(self.layers)))
        chosen: list[int] = []
        for _ in range(min(self.cfg.gamma, len(left))):
            weights = [self.probs[i] for i in left]
            total = sum(weights)
            if total <= 0:  # only zero-ratio blocks left: uniform among them
                pick = left[self.rng.randrange(len(left))]
            else:
                x, acc, pick = self.rng.random() * total, 0.0, left[-1]
                for i, w in zip(left, weights):
                    acc += w
                    if x < acc:
                        pick = i
                        break
            chosen.append(pick)
            left.remove(pick)
        return sorted(chosen)

    def build_optimizer(self, groups: list[dict], *, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
        if not self.use_galore:
            return super().build_optimizer(groups, lr=lr, betas=betas)
        block_ids = {id(p) for names in self.layers for p in self._params(names)}
        c = self.cfg
        out = []
        for g in groups:  # split each group: the blocks' matrices get GaLore's projection
            low = [p for p in g["params"] if id(p) in block_ids and p.dim() == 2]
            rest = [p for p in g["params"] if not (id(p) in block_ids and p.dim() == 2)]
            extra = {k: v for k, v in g.items() if k != "params"}
            if rest:
                out.append({**extra, "params": rest})
            if low:
                out.append({**extra, "params": low, "rank": self.galore_rank, "update_proj_gap": c.galore_update_proj_gap,
                            "scale": c.galore_scale, "proj_type": "std"})
        return checkpointable_galore_adamw()(out, lr=lr, betas=betas, eps=1e-8, no_deprecation_warning=True)

    def _params(self, names: list[str]) -> list[nn.Parameter]:
        return [self._by_name[n] for n in names]

    def report(self) -> dict:
        return {"sampling": "uniform (every outlier ratio is 0 at this outlier_m)" if self.uniform
                else "proportional to the OWL outlier ratio",
                "score": "OWL: |W_ij| * ||X_j||, outliers above outlier_m x the layer's mean score",
                "calib": self.calib, "outlier_m": self.cfg.outlier_m, "outlier_ratio": self.ratios,
                "sampling_prob": self.probs, "galore": self.use_galore, "galore_rank": self.galore_rank,
                "galore_note": (f"GaLore AdamW, rank {self.galore_rank}, projection refreshed every "
                                f"{self.cfg.galore_update_proj_gap} steps" if self.use_galore else
                                f"plain AdamW: {self.galore_why_not}")}


_GALORE_CLS = None


def checkpointable_galore_adamw():
    """galore_torch's AdamW whose state_dict holds tensors only: its per-parameter GaLoreProjector (a Python
    object) is saved as the projection matrix and rebuilt on load, so ftlab's training-state checkpoints (read
    with weights_only=True) resume it exactly."""
    global _GALORE_CLS
    if _GALORE_CLS is not None:
        return _GALORE_CLS
    from galore_torch import GaLoreAdamW
    from galore_torch.galore_projector import GaLoreProjector

    class CheckpointableGaLoreAdamW(GaLoreAdamW):
        def state_dict(self):
            sd = super().state_dict()
            state = {}
            for k, v in sd["state"].items():
                if "projector" in v:
                    v = {kk: vv for kk, vv in v.items() if kk != "projector"}
                    v["galore_ortho"] = self.state_projector_matrix(k)
                state[k] = v
            return {**sd, "state": state}

        def state_projector_matrix(self, index: int) -> torch.Tensor:
            p = [p for g in self.param_groups for p in g["params"]][index]
            return self.state[p]["projector"].ortho_matrix

        def load_state_dict(self, state_dict):
            orthos = {k: v["galore_ortho"] for k, v in state_dict["state"].items() if "galore_ortho" in v}
            stripped = {k: {kk: vv for kk, vv in v.items() if kk != "galore_ortho"}
                        for k, v in state_dict["state"].items()}
            super().load_state_dict({**state_dict, "state": stripped})
            index = 0
            for g in self.param_groups:
                for p in g["params"]:
                    if index in orthos:
                        proj = GaLoreProjector(g["rank"], update_proj_gap=g["update_proj_gap"], scale=g["scale"],
                                               proj_type=g["proj_type"])
                        proj.ortho_matrix = orthos[index].to(p.device)
                        self.state[p]["projector"] = proj
                    index += 1

    _GALORE_CLS = CheckpointableGaLoreAdamW
    return _GALORE_CLS
