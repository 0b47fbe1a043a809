"""CorDA (Yang et al., 2024, arXiv:2406.05223): context-oriented decomposition adaptation, through peft.

Calibration rows, one per forward (peft's covariance hook needs batch size 1, stack notes G7), give each target
layer's input covariance C; the SVD of W·C splits W into components. KPM (knowledge-preserved mode) trains the r
components with the *smallest* singular values and freezes the rest; IPM (instruction-previewed mode) trains the
*largest* r. The base keeps the residual, so the export converts the adapter to apply to the original W (stack
notes G5). peft's CorDA module imports `attrs` (G6).

What the calibration rows stand for decides what the decomposition protects (the official code, iboing/CorDA:
tools/build_KPA.sh calibrates KPM on `nqopen` questions, the knowledge to keep; tools/build_IPA.sh calibrates IPM on
the fine-tuning data, MetaMathQA; build_corda.py: --calib_loader_size 256). So `calib_source` defaults by mode:
- kpm: `general`, the run's general rows (ftlab.data.sources.general_rows): `data.mix_source` when set, else the
  replay of the tiny world's pretraining skills `data.mix_skills` (train split; the forgetting eval scores the test
  split). `data.mix` need not be > 0: the general rows calibrate whether or not they are also mixed in;
- ipm: `task`, a seeded sample of the run's training rows;
- or a local .jsonl/.json file or a hub dataset id (train split) of text in field `calib_field`, e.g. NQ-open's
  questions: method.calib_source=nq_open method.calib_field=question.
`calib_samples` (256, the paper's) rows; peft asks for ~hidden / tokens_per_sample x 128 of them. After the
covariances are collected each is checked for full rank (width of its layer's input): a deficient one is said on
stderr and recorded (`train.method.covariance`); peft damps it (1 % of the mean diagonal, doubled until invertible).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from ftlab.config.bounds import at_least, choice
from ftlab.config.registry import ConfigError
from ftlab.methods.base import METHODS, MethodContext
from ftlab.methods.lora import Lora, LoraConfig

if TYPE_CHECKING:
    import peft
    from torch import nn

CORDA_MODES = ("kpm", "ipm")
CALIB_SOURCES = ("general", "task")  # or a file / hub dataset id
MODE_SOURCE = {"kpm": "general", "ipm": "task"}


@dataclass
class CordaConfig(LoraConfig):
    """CorDA: SVD of W times the input covariance of calibration rows (kpm: general data; ipm: the task's)."""

    name: str = "corda"
    default_lr: ClassVar[float] = 2e-5  # the authors' (peft examples/corda_finetuning/tools/train_CorDA.sh), as pissa
    mode: str = "kpm"  # kpm: train the smallest r components (keep knowledge) | ipm: the largest r (task)
    # null: the mode's (kpm: general, ipm: task) | general: the run's general rows | task: its training rows |
    # a local .jsonl/.json file or a hub dataset id of text in `calib_field`
    calib_source: Optional[str] = None
    calib_field: str = "text"
    calib_samples: int = 256  # rows run through the base, one at a time, for the covariance (the paper's 256)

    @property
    def source(self) -> str:
        return self.calib_source or MODE_SOURCE[self.mode]

    def check(self) -> None:
        super().check()
        choice("method.mode", self.mode, CORDA_MODES)
        at_least("method.calib_samples", self.calib_samples, 1)
        if self.calib_source is not None:
            s = self.calib_source.strip()
            if not s:
                raise ConfigError("method.calib_source: empty; give general, task, a .jsonl file or a hub dataset id "
                                  "(or null: the mode's own, kpm: general, ipm: task)")
            if s not in CALIB_SOURCES and _looks_local(s) and not os.path.exists(os.path.expanduser(s)):
                raise ConfigError(f"method.calib_source: file {s!r} does not exist; give a .jsonl of text (field "
                                  f"method.calib_field={self.calib_field!r}), a hub dataset id, general or task")

    def check_run(self, run: Any) -> None:
        """Across groups: `general` needs a source of general rows in the data config."""
        if self.source != "general":
            return
        d = run.data
        if d.mix_source is not None:
            if _looks_local(d.mix_source) and not os.path.exists(os.path.expanduser(d.mix_source)):
                raise ConfigError(f"data.mix_source: file {d.mix_source!r} does not exist (method=corda calibrates "
                                  f"on it: method.calib_source={self.source})")
            return
        if d.source == "synth" and d.mix_skills:
            return
        why = ("kpm calibrates on general rows, which stand for the knowledge to keep"
               if self.calib_source is None else "method.calib_source=general")
        raise ConfigError(
            f"method.calib_source: method=corda {why}, and this data has none: set data.mix_source=FILE.jsonl or a "
            "hub dataset id of general text (used for calibration even with data.mix=0), or "
            "method.calib_source=FILE.jsonl|hub id (text in method.calib_field; the paper's KPM: NQ-open questions, "
            "method.calib_source=nq_open method.calib_field=question), or method.calib_source=task (calibrate on the "
            "task's own rows: not the paper's KPM)")


def _looks_local(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.endswith((".jsonl", ".json")) or s.count("/") >= 2


@METHODS.register("corda", config=CordaConfig)
class Corda(Lora):
    name = "corda"
    rewrites_base = True

    def lora_options(self) -> dict:
        from peft.tuners.lora.config import CordaConfig

        # the covariances are kept past preprocess_corda for the rank check, then dropped here (`_check_rank`)
        return {**super().lora_options(), "init_lora_weights": "corda",
                "corda_config": CordaConfig(corda_method=self.cfg.mode, prune_temporary_fields=False)}

    def calibration_rows(self, ctx: MethodContext) -> list[dict]:
        """`calib_samples` rows from `calib_source`, encoded like training rows."""
        from ftlab.train.batches import encode_example

        src, n = self.cfg.source, self.cfg.calib_samples
        if src == "task":
            return ctx.calibration_rows(n)
        from ftlab.data.sources import general_rows

        if src == "general":
            data = getattr(ctx, "data", None)
            if data is None or (data.mix_source is None and not data.mix_skills):
                raise ValueError("method corda: calib_source=general needs the run's data config with general rows "
                                 "(data.mix_source, or data.mix_skills for synthetic data); "
                                 "or set method.calib_source=task|FILE")
        else:
            from ftlab.config.schema import DataConfig

            data = DataConfig(name=f"calib:{src}", mix_source=src, mix_field=self.cfg.calib_field)
        rows = general_rows(data, n, ctx.seed)
        return [encode_example(ctx.tokenizer, r["prompt"], r["response"], ctx.max_length) for r in rows]

    def preprocess(self, model: nn.Module, config: peft.LoraConfig, ctx: MethodContext) -> None:
        import torch
        from peft.tuners.lora.corda import preprocess_corda

        from ftlab.models.structure import eval_mode, model_device

        rows = self.calibration_rows(ctx)
        device = model_device(model)

        def run_model() -> None:
            for r in rows:  # batch size 1 (G7)
                model(input_ids=torch.tensor([r["input_ids"]], device=device))

        with eval_mode(model):
            preprocess_corda(model, config, run_model=run_model)
        self._check_rank(model, config, sum(len(r["input_ids"]) for r in rows), len(rows))

    def _check_rank(self, model: nn.Module, config: peft.LoraConfig, tokens: int, n_rows: int) -> None:
        """Each target's covariance against its input width; then drop the fields peft would have pruned."""
        import torch
        from peft.tuners.lora.corda import target_modules

        deficient, n_targets = [], 0
        for name, module in target_modules(model, config):
            cov = module.covariance_matrix.float()
            ev = torch.linalg.eigvalsh(cov)  # symmetric PSD: its eigenvalues are its singular values
            tol = ev.abs().max() * cov.shape[0] * torch.finfo(torch.float32).eps
            rank = int((ev > tol).sum())
            n_targets += 1
            if rank < cov.shape[0]:
                deficient.append((rank / cov.shape[0], name, rank, cov.shape[0]))
            for attr in ("sample_count", "covariance_matrix", "corda_method", "rank"):
                if hasattr(module, attr):
                    delattr(module, attr)
        self.covariance = {"source": self.cfg.source, "rows": n_rows, "tokens": tokens, "targets": n_targets,
                           "full_rank": n_targets - len(deficient)}
        if not deficient:
            return
        _, name, rank, width = min(deficient)
        self.covariance["lowest"] = {"module": name, "rank": rank, "width": width}
        hint = (f"raise method.calib_samples (now {n_rows}): {tokens} tokens cannot span a width of {width}"
                if tokens < width else "the inputs span fewer directions than the width (e.g. a small vocabulary "
                "feeding the first block), so more rows of the same data may not help")
        print(f"ftlab: method corda: the calibration covariance is rank-deficient in {len(deficient)} of {n_targets} "
              f"target layers (lowest: {name}, rank {rank} of {width}; {n_rows} rows from {self.cfg.source}, "
              f"{tokens} tokens). peft damps it, so the missing directions count as carrying no calibration "
              f"energy; {hint}.", file=sys.stderr)

    def report(self) -> dict:
        cov = getattr(self, "covariance", None)
        return {"covariance": cov} if cov else {}
