"""The LoRA family through peft: LoRA, rsLoRA, DoRA, PiSSA and OLoRA (CorDA and LoRA-GA, which need calibration
data first, have their own modules).

LoRA (Hu et al., 2021, arXiv:2106.09685): the base weights are frozen; each target linear gets B @ A of rank r,
scaled by alpha/r (alpha/sqrt(r) with rsLoRA). B starts at zero, so the tuned model equals the base at step 0.

One scale convention for the whole family (docs/methods.md, "Scale"): alpha = 8 = the default r, so every variant
starts at scale alpha/r = 1 (rsLoRA: r = 64, alpha/sqrt(r) = 1), as the PiSSA and CorDA papers run their LoRA
baselines and as Hu et al. set alpha to the first r tried. Differences between the variants are then not
learning-rate differences.

The variants are small subclasses: each says which peft options it sets (`lora_options`), and, when its init needs
the model first, what it runs before `get_peft_model` (`preprocess`). Inits that rewrite the base weights
(`rewrites_base = True`: PiSSA, OLoRA, CorDA, LoRA-GA) keep their initial adapter and export through peft's
weight conversion, so the saved adapter applies to the ORIGINAL base weights.

- rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732): LoRA with the rank-stabilised scaling alpha/sqrt(r); a config
  variant (`use_rslora` defaults to true, r to 64), everything else is `Lora`. At one rank it is LoRA with another
  scale; its claim is about high ranks at a fixed alpha (lora vs rslora at r=64: scale 0.125 vs 1).
- DoRA (Liu et al., 2024, arXiv:2402.09353): weight-decomposed LoRA through peft's `use_dora`. Each target
  weight is split into a magnitude (one trained scalar per output feature) and a direction that LoRA updates;
  the magnitude starts at the base weight's column norms, so the model equals the base at step 0.
- PiSSA (Meng et al., 2024, arXiv:2404.02948): LoRA initialised from the principal singular components. peft's
  `init_lora_weights="pissa"` (or "pissa_niter_N", a fast randomized SVD) puts the top-r singular components of
  W into A and B and leaves the residual in the base weight.
- OLoRA (Büyükakyüz, 2024, arXiv:2406.01775): LoRA initialised from an orthonormal QR decomposition of W
  (peft's `init_lora_weights="olora"`); the base keeps the residual.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Optional

from ftlab.config.bounds import at_least
from ftlab.config.registry import ConfigError
from ftlab.methods.base import ALL_LINEAR, METHODS, Method, MethodConfig, MethodContext

if TYPE_CHECKING:
    import peft
    from torch import nn


# ---------------------------------------------------------------------------------------------------- configs
@dataclass
class LoraConfig(MethodConfig):
    name: str = "lora"
    r: int = 8
    alpha: float = 8.0  # scale alpha/r = 1 at the default rank, the family's one convention
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    use_rslora: bool = False

    def check(self) -> None:
        super().check()
        at_least("method.r", self.r, 1)
        if not self.alpha > 0:
            raise ConfigError(f"method.alpha: must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method.dropout: must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError("method.target_modules: must name at least one module (e.g. q_proj)")


@dataclass
class RsLoraConfig(LoraConfig):
    """rsLoRA: LoRA scaled by alpha/sqrt(r) instead of alpha/r; high rank, where that scaling is the point."""

    name: str = "rslora"
    r: int = 64  # alpha/sqrt(r) = 8/8 = 1, the family's scale; LoRA at r=64 with the same alpha: 0.125
    use_rslora: bool = True


@dataclass
class DoraConfig(LoraConfig):
    """DoRA: LoRA on the direction of each weight plus a trained per-column magnitude."""

    name: str = "dora"


@dataclass
class PissaConfig(LoraConfig):
    """PiSSA: the adapter starts as the top-r singular components of W; the residual stays frozen."""

    name: str = "pissa"
    # The authors' rate (GraphPKU/PiSSA scripts/metamath_llama2_7b/run_pissa.sh: 2e-5, as their full fine-tuning):
    # A and B start at sqrt of the top singular values, so one step moves W far more than LoRA's from B = 0.
    default_lr: ClassVar[float] = 2e-5
    svd_niter: Optional[int] = 4  # fast randomized SVD with this many subspace iterations; None: full SVD

    def check(self) -> None:
        super().check()
        at_least("method.svd_niter", self.svd_niter, 1, allow_none=True)


@dataclass
class OloraConfig(LoraConfig):
    """OLoRA: the adapter starts from a QR decomposition of W; the residual stays frozen."""

    name: str = "olora"


# ---------------------------------------------------------------------------------------------------- methods
@METHODS.register("lora", config=LoraConfig)
class Lora(Method):
    name = "lora"
    rewrites_base = False  # True: the init changes the base weights (the residual W - BA stays in the model)

    def __init__(self, cfg):
        super().__init__(cfg)
        self._init_dir: tempfile.TemporaryDirectory | None = None

    def lora_options(self) -> dict:
        """peft.LoraConfig options beyond r/alpha/dropout/targets (a variant's whole definition)."""
        return {"use_rslora": self.cfg.use_rslora}

    def peft_config(self) -> peft.LoraConfig:
        import peft

        c = self.cfg
        return peft.LoraConfig(task_type="CAUSAL_LM", r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout,
                               target_modules=list(c.target_modules), **self.lora_options())

    def preprocess(self, model: nn.Module, config: peft.LoraConfig, ctx: MethodContext) -> None:
        """Run on the base before get_peft_model (CorDA's covariance, LoRA-GA's gradient estimate)."""

    def postprocess(self, model: peft.PeftModel, ctx: MethodContext) -> None:
        """Run on the adapter peft built, before the initial adapter is kept (LoRA-GA's own init)."""

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        import peft

        check_targets(model, self.cfg.target_modules)
        config = self.peft_config()
        self.preprocess(model, config, ctx)
        model = peft.get_peft_model(model, config)
        self.postprocess(model, ctx)
        if self.rewrites_base:
            self._save_initial(model)
        return model

    def _save_initial(self, model) -> None:
        """Keep the initial adapter as a plain LoRA adapter: export converts against it (stack notes G5)."""
        pc = model.peft_config["default"]
        init = pc.init_lora_weights
        self._init_dir = tempfile.TemporaryDirectory(prefix=f"ftlab_{self.name}_init_")
        pc.init_lora_weights = True
        try:
            model.save_pretrained(self._init_dir.name)
        finally:
            pc.init_lora_weights = init

    def use_kernels(self, model: nn.Module, device) -> Optional[dict]:
        return fuse_lora_linears(model, device)

    def export(self, model: nn.Module, out_dir: Path) -> None:
        # adapter_config.json + adapter_model.safetensors
        if self._init_dir is None:
            model.save_pretrained(out_dir)
            return
        # rank 2r adapter that reproduces (residual + BA) when added to the original W
        model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=self._init_dir.name)


@METHODS.register("rslora", config=RsLoraConfig)
class RsLora(Lora):
    name = "rslora"


@METHODS.register("dora", config=DoraConfig)
class Dora(Lora):
    name = "dora"

    def lora_options(self) -> dict:
        return {**super().lora_options(), "use_dora": True}

    def use_kernels(self, model: nn.Module, device) -> Optional[dict]:
        return None  # DoRA's magnitude and column norms are not in the fused LoRA kernel: peft's forward


@METHODS.register("pissa", config=PissaConfig)
class Pissa(Lora):
    name = "pissa"
    rewrites_base = True

    def lora_options(self) -> dict:
        n = self.cfg.svd_niter
        return {**super().lora_options(), "init_lora_weights": "pissa" if n is None else f"pissa_niter_{n}"}


@METHODS.register("olora", config=OloraConfig)
class Olora(Lora):
    name = "olora"
    rewrites_base = True

    def lora_options(self) -> dict:
        return {**super().lora_options(), "init_lora_weights": "olora"}


def check_targets(model: nn.Module, targets) -> None:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in targets if m not in present]
    if missing:
        raise ValueError(f"method.target_modules: {missing} not found in the model; "
                         f"linear modules it has: {sorted(n for n in present if n.endswith('proj'))}")


def fuse_lora_linears(model: nn.Module, device) -> dict:
    """Every peft lora.Linear of `model` computes base + LoRA through ftlab.kernels' fused LoRA linear.

    The swap is the module's forward only (an instance attribute): parameters, state dict and so the exported
    adapter are peft's. Calls the kernel does not cover (adapters disabled or merged, several active adapters, a
    LoRA variant such as DoRA, lora_bias, fan_in_fan_out, dropout > 0 while training, extra arguments) go to peft's
    own forward, unchanged.
    """
    import types

    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    from ftlab.kernels.lora_linear import kernel_supported

    if not kernel_supported(device):
        print(f"ftlab: hw.kernels: the fused LoRA kernel does not run on {device} (CUDA, or CPU under "
              f"TRITON_INTERPRET=1); peft's LoRA forward is used", flush=True)
        return {"lora_linear": 0, "lora_linear_skipped": f"device {device}"}
    n = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear and "_ftlab_peft_forward" not in module.__dict__:
            module._ftlab_peft_forward = module.forward
            module.forward = types.MethodType(_fused_lora_forward, module)
            n += 1
    return {"lora_linear": n}


def _fused_lora_forward(self, x, *args, **kwargs):
    """peft lora.Linear.forward through the fused kernel for the plain single-adapter case (see fuse_lora_linears)."""
    from torch import nn

    from ftlab.kernels.lora_linear import lora_linear

    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    base = self.get_base_layer()
    if (args or kwargs or name is None or name not in self.lora_A or self.disable_adapters or self.merged
            or name in self.lora_variant or self.lora_bias.get(name, False) or self.fan_in_fan_out
            or type(base) is not nn.Linear):
        return self._ftlab_peft_forward(x, *args, **kwargs)
    drop = self.lora_dropout[name]
    if self.training and isinstance(drop, nn.Dropout) and drop.p > 0:  # peft's own dropout draw, not a copy of it
        return self._ftlab_peft_forward(x)
    return lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                       self.scaling[name])
