"""SSF: Scaling & Shifting your Features (Lian et al., 2022, "Scaling & Shifting Your Features: A New Baseline
for Efficient Model Tuning", NeurIPS 2022, arXiv:2210.08823).

A trained per-feature scale γ and shift β, y' = γ ⊙ y + β, at the places the official code inserts them
(dongzelian/SSF models/vision_transformer.py: `ssf_ada` after the patch embedding, after norm1 and norm2 of every
block, after qkv / proj / fc1 / fc2, after the final norm); the model is frozen. In a Llama-style decoder:
- `target_modules`: the output of every target linear (the attention and MLP projections);
- `norms`: the output of each block's input_layernorm and post_attention_layernorm (the paper's norm1 / norm2), and
  of the final norm (scale only unless `final_norm_shift`, below);
- `embedding`: the output of the token embedding (the paper's patch embedding).
γ starts at 1 and β at 0, so the model equals the base at step 0 (the paper's code draws them from N(1, 0.02) /
N(0, 0.02); exact identity keeps regularisers at 0 at the first step).

The export re-parameterises, as the paper does for inference, into a plain model of the same architecture:
- a linear: W' = diag(γ) W, b' = γ ⊙ b + β;
- a norm: its weight times γ; its shift goes into the bias of the linears it feeds (input_layernorm -> q/k/v,
  post_attention_layernorm -> gate/up: b += W β), applied before those linears' own scale/shift;
- the embedding: every row E_t' = γ ⊙ E_t + β; tied input/output embeddings are untied in the export (the head
  keeps the original matrix), which is exact.
Biases come from the config's switches (Llama: `attention_bias`, `mlp_bias`; biases of other linears in those
groups are zeros). Where a shift has nowhere to go the method refuses in `prepare`, before training, naming what to
turn off: a target without a bias switch (Qwen2's o_proj and MLP: drop them from `target_modules`), a norm feeding
such linears (Qwen2's post_attention_layernorm: `norms=false`), and the final norm's shift, whose bias would be the
LM head's (no Llama-style model has one: `final_norm_shift` stays false, the one place where ftlab trains the scale
without the shift). Norms inside the attention (Qwen3's q_norm / k_norm) are not SSF points: the paper's blocks have
none, and their shift feeds no linear.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ftlab.config.registry import ConfigError
from ftlab.methods.base import ALL_LINEAR, METHODS, Method, MethodConfig, MethodContext
from ftlab.methods.lift import target_linears

if TYPE_CHECKING:
    import torch
    from torch import nn

BIAS_SWITCHES = ("attention_bias", "mlp_bias")  # config flags that give linears a bias (Llama, Mistral-likes)
# a block norm -> the linears its output feeds (relative to the block)
NORM_CONSUMERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


@dataclass
class SsfConfig(MethodConfig):
    """SSF: trained scales and shifts after the target linears, the norms and the embedding, folded on export."""

    name: str = "ssf"
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    norms: bool = True  # after every block's input/post-attention norm and the final norm (the paper's norm1/norm2)
    embedding: bool = True  # after the token embedding (the paper's patch embedding)
    final_norm_shift: bool = False  # a shift after the final norm needs a bias on the LM head (none in Llamas)

    def check(self) -> None:
        super().check()
        if not (self.target_modules or self.norms or self.embedding):
            raise ConfigError("method.target_modules: nothing to scale; name at least one module (e.g. q_proj) or "
                              "set method.norms=true / method.embedding=true")
        if self.final_norm_shift and not self.norms:
            raise ConfigError("method.final_norm_shift: needs method.norms=true (the final norm is an SSF point "
                              "only with the norms)")


def _ssf_hook(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    out = out * module.ssf_scale.to(out.dtype)
    shift = getattr(module, "ssf_shift", None)
    return out if shift is None else out + shift.to(out.dtype)


def folded_config(model: nn.Module, untie: bool = False):
    """A copy of the model's config with every bias switch it has turned on (and the embeddings untied)."""
    cfg = copy.deepcopy(model.config)
    for k in BIAS_SWITCHES:
        if hasattr(cfg, k):
            setattr(cfg, k, True)
    if untie:
        cfg.tie_word_embeddings = False
        if hasattr(cfg, "get_text_config"):
            cfg.get_text_config().tie_word_embeddings = False
    return cfg


def _final_norm(model: nn.Module) -> tuple[str, nn.Module] | None:
    from ftlab.models.structure import decoder_layers

    prefix, _ = decoder_layers(model)
    parent = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    name = f"{parent}.norm" if parent else "norm"
    try:
        return name, model.get_submodule(name)
    except AttributeError:
        return None


@METHODS.register("ssf", config=SsfConfig)
class Ssf(Method):
    name = "ssf"

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        import torch
        from torch import nn

        c = self.cfg
        self.targets = sorted(target_linears(model, c.target_modules)) if c.target_modules else []
        self.norms, self.feeds = self._norm_points(model) if c.norms else ([], {})
        self.final = _final_norm(model)[0] if c.norms else None
        self.embedding = None
        if c.embedding:
            emb = model.get_input_embeddings()
            self.embedding = next(n for n, m in model.named_modules() if m is emb)
        self.tied = self.embedding is not None and model.get_output_embeddings() is not None and \
            model.get_output_embeddings().weight is model.get_input_embeddings().weight
        self._check_foldable(model)
        self.switches = [k for k in BIAS_SWITCHES if hasattr(model.config, k)]
        for p in model.parameters():
            p.requires_grad_(False)
        points = [(n, True) for n in self.targets + self.norms] + \
            ([(self.final, c.final_norm_shift)] if self.final else []) + \
            ([(self.embedding, True)] if self.embedding else [])
        for name, shift in points:
            mod = model.get_submodule(name)
            w = mod.weight
            width = w.shape[0] if w.dim() == 1 or isinstance(mod, nn.Linear) else w.shape[1]
            mod.register_parameter("ssf_scale", nn.Parameter(torch.ones(width, dtype=w.dtype, device=w.device)))
            if shift:
                mod.register_parameter("ssf_shift", nn.Parameter(torch.zeros(width, dtype=w.dtype, device=w.device)))
            mod.register_forward_hook(_ssf_hook)
        return model

    def _norm_points(self, model: nn.Module) -> tuple[list[str], dict[str, list[str]]]:
        """The blocks' input/post-attention norms and {norm: the linears it feeds}; a block without them is refused."""
        from ftlab.models.structure import decoder_layers

        prefix, layers = decoder_layers(model)
        norms, feeds = [], {}
        for i, layer in enumerate(layers):
            for norm, consumers in NORM_CONSUMERS.items():
                try:
                    layer.get_submodule(norm)
                    for cons in consumers:
                        layer.get_submodule(cons)
                except AttributeError:
                    raise ValueError(f"method=ssf: block {i} of {type(model).__name__} has no {norm} feeding "
                                     f"{', '.join(consumers)}, so ftlab does not know where a shift after its norms "
                                     "folds; set method.norms=false (SSF on the linears and the embedding)") from None
                norms.append(f"{prefix}.{i}.{norm}")
                feeds[f"{prefix}.{i}.{norm}"] = [f"{prefix}.{i}.{cons}" for cons in consumers]
        if _final_norm(model) is None:
            raise ValueError(f"method=ssf: {type(model).__name__} has no final norm next to its blocks; set "
                             "method.norms=false")
        return norms, feeds

    def _check_foldable(self, model: nn.Module) -> None:
        """Every shift needs a bias to fold into: build the folded architecture (meta device, no memory) and refuse,
        before training, the points whose shift has none."""
        import torch

        with torch.device("meta"):
            skeleton = type(model)(folded_config(model))

        def no_bias(name: str) -> bool:
            return getattr(skeleton.get_submodule(name), "bias", None) is None

        missing = [n for n in self.targets if no_bias(n)]
        if missing:
            mods = sorted({n.rsplit(".", 1)[-1] for n in missing})
            keep = ",".join(sorted(set(self.cfg.target_modules) - set(mods))) or "q_proj"
            raise ValueError(f"method=ssf: {type(model).__name__} has no bias on {mods} and no config switch for one, "
                             "so their shift cannot be folded into a plain model; drop them from "
                             f"method.target_modules (e.g. method.target_modules=[{keep}])")
        blocked = sorted({n.rsplit(".", 1)[-1] for n, cons in self.feeds.items() if any(no_bias(x) for x in cons)})
        if blocked:
            raise ValueError(f"method=ssf: in {type(model).__name__} the linears after {blocked} have no bias and no "
                             "config switch for one, so the shift after those norms cannot be folded into a plain "
                             "model; set method.norms=false")
        if self.cfg.final_norm_shift:
            head = model.get_output_embeddings()
            hname = next(n for n, m in model.named_modules() if m is head)
            if no_bias(hname):
                raise ValueError(f"method.final_norm_shift: {type(model).__name__}'s LM head ({hname}) has no bias "
                                 "to fold the shift after the final norm into; set method.final_norm_shift=false "
                                 "(the final norm then gets a scale only)")

    def folded_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        import torch

        sd = {k: v for k, v in model.state_dict().items() if not k.endswith((".ssf_scale", ".ssf_shift"))}
        shift_in: dict[str, torch.Tensor] = {}  # linear -> the shift of the norm before it (its input)
        with torch.no_grad():
            for name in self.norms + ([self.final] if self.final else []):
                norm = model.get_submodule(name)
                sd[f"{name}.weight"] = (norm.ssf_scale.float() * norm.weight.float()).to(norm.weight.dtype)
                for cons in self.feeds.get(name, []):
                    shift_in[cons] = norm.ssf_shift.float()
            biased = set(self.targets) | set(shift_in)
            for name in sorted(biased):
                lin = model.get_submodule(name)
                w = lin.weight.float()
                bias = lin.bias.float() if lin.bias is not None else torch.zeros(w.shape[0], device=w.device)
                if name in shift_in:
                    bias = bias + w @ shift_in[name]
                if name in self.targets:
                    g, b = lin.ssf_scale.float(), lin.ssf_shift.float()
                    sd[f"{name}.weight"] = (g[:, None] * w).to(lin.weight.dtype)
                    bias = g * bias + b
                sd[f"{name}.bias"] = bias.to(lin.weight.dtype)
            if self.embedding:
                emb = model.get_submodule(self.embedding)
                e = emb.weight.float()
                sd[f"{self.embedding}.weight"] = (e * emb.ssf_scale.float() + emb.ssf_shift.float()).to(emb.weight.dtype)
                if self.tied:  # the head keeps the original matrix: untied in the export
                    head = model.get_output_embeddings()
                    hname = next(n for n, m in model.named_modules() if m is head)
                    sd[f"{hname}.weight"] = emb.weight.detach().clone()
        return sd

    def export(self, model: nn.Module, out_dir: Path) -> None:
        import torch
        from torch import nn

        sd = self.folded_state_dict(model)
        cfg = folded_config(model, untie=self.tied)
        with torch.device("meta"):
            skeleton = type(model)(cfg)
        for name, m in skeleton.named_modules():  # linears the switches gave a bias that SSF did not train
            if isinstance(m, nn.Linear) and m.bias is not None and f"{name}.bias" not in sd:
                w = sd[f"{name}.weight"]
                sd[f"{name}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        model.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
        cfg = folded_config(model, untie=self.tied)  # after save_pretrained filled in `architectures`
        cfg.save_pretrained(out_dir)

    def report(self) -> dict:
        return {"targets": len(self.targets), "norms": len(self.norms) + (1 if self.final else 0),
                "final_norm_shift": self.cfg.final_norm_shift, "embedding": self.embedding is not None,
                "export_sets": {k: True for k in self.switches}, "export_unties_embeddings": self.tied}
