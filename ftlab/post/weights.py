"""A finished run's trained weights, read tensor by tensor from its export (checkpoints/final), in the base model's
parameter names: a whole model (safetensors, maybe sharded) or a LoRA adapter (peft's adapter_model.safetensors).

Nothing here holds more than one tensor of a run at a time: `tuned(name, base)` / `delta(name, base)` read one
parameter. An export that is neither (DoRA, IA3, prompt tuning: ftlab.config.post.NO_WEIGHT_DELTA) is refused with
the reason.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

import torch

FINAL = Path("checkpoints") / "final"
_PEFT_PREFIX = "base_model.model."


class RunWeights:
    """The export of one run. `kind` is "full" (every tensor stored) or "adapter" (LoRA: delta = B @ A * scaling)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / FINAL
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: no exported weights (a run writes checkpoints/final when it "
                                    "completes); run it to completion first")
        cfg_path = self.dir / "adapter_config.json"
        self._handles: dict[Path, object] = {}
        if cfg_path.is_file():
            self.kind = "adapter"
            self._read_adapter(json.loads(cfg_path.read_text()))
        else:
            self.kind = "full"
            self._read_full()

    # ------------------------------------------------------------------------------------------ reading
    def _open(self, path: Path):
        from safetensors import safe_open

        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def _read_full(self) -> None:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.where = {k: self.dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.dir}: no *.safetensors weights and no adapter_config.json")
            self.where = {k: f for f in files for k in self._open(f).keys()}
        self.names = set(self.where)

    def _read_adapter(self, cfg: dict) -> None:
        what = cfg.get("peft_type")
        if what != "LORA" or cfg.get("use_dora"):
            why = "DoRA (its magnitude vector re-normalises the update)" if cfg.get("use_dora") else what
            raise ValueError(f"{self.dir}: a {why} adapter has no additive weight delta; post transforms and merging "
                             "take whole-model exports and LoRA adapters")
        path = self.dir / "adapter_model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the adapter's weights are missing (only safetensors are read)")
        self.adapter_path = path
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        self.rslora = bool(cfg.get("use_rslora"))
        self.alpha = float(cfg["lora_alpha"])
        self.alpha_pattern = dict(cfg.get("alpha_pattern") or {})
        self.modules: dict[str, tuple[str, str]] = {}  # base parameter name -> (lora_A key, lora_B key)
        other = []
        for key in self._open(path).keys():
            m = re.fullmatch(r"(.+)\.lora_A\.weight", key)
            if m:
                module = m.group(1)[len(_PEFT_PREFIX):] if m.group(1).startswith(_PEFT_PREFIX) else m.group(1)
                self.modules[f"{module}.weight"] = (key, f"{m.group(1)}.lora_B.weight")
            elif not key.endswith(".lora_B.weight"):
                other.append(key)
        if other:  # modules_to_save, embedding adapters, bias training: not a B @ A delta
            raise ValueError(f"{path}: tensors that are not LoRA A/B pairs ({other[:3]}); post transforms and "
                             "merging read plain LoRA adapters (no modules_to_save, no trained biases)")
        self.names = set(self.modules)

    def _scaling(self, module: str, r: int) -> float:
        alpha = self.alpha
        for pattern, a in self.alpha_pattern.items():  # peft's rule: the key matches the module name's tail
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(a)
                break
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    # ------------------------------------------------------------------------------------------ tensors
    def delta(self, name: str, base: torch.Tensor) -> Optional[torch.Tensor]:
        """theta_tuned - theta_base of parameter `name` in float32 (None: the run did not change it)."""
        if name not in self.names:
            return None
        if self.kind == "full":
            return self._stored(name, base).float() - base.float()
        a_key, b_key = self.modules[name]
        h = self._open(self.adapter_path)
        a, b = h.get_tensor(a_key).float(), h.get_tensor(b_key).float()
        d = b @ a
        if self.fan_in_fan_out:
            d = d.T
        d = d * self._scaling(name[: -len(".weight")], a.shape[0])
        if d.shape != base.shape:
            raise ValueError(f"{self.adapter_path}: {name} delta {tuple(d.shape)} does not fit the base's "
                             f"{tuple(base.shape)}: the adapter was trained on another base")
        return d

    def tuned(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """theta_tuned of parameter `name` in the base's dtype (the base itself when the run did not change it)."""
        if name not in self.names:
            return base
        if self.kind == "full":
            return self._stored(name, base).to(base.dtype)
        return (base.float() + self.delta(name, base)).to(base.dtype)

    def _stored(self, name: str, base: torch.Tensor) -> torch.Tensor:
        t = self._open(self.where[name]).get_tensor(name)
        if t.shape != base.shape:
            raise ValueError(f"{self.where[name]}: {name} has shape {tuple(t.shape)}, the base {tuple(base.shape)}: "
                             "the run was trained on another base")
        return t

    def check_fits(self, param_names: set[str]) -> None:
        """Every tensor of the export is a parameter of the base (an export with its own extra tensors, e.g. SSF's
        untied head, cannot be scaled against the base)."""
        extra = sorted(self.names - param_names)
        if extra:
            raise ValueError(f"{self.dir}: tensors the base model does not have ({extra[:3]}); post transforms and "
                             "merging need an export in the base's own parameter names")


def block_index(name: str, prefix: str) -> Optional[int]:
    """The decoder block a parameter belongs to (`<prefix>.<i>.`), None outside the blocks."""
    m = re.match(rf"{re.escape(prefix)}\.(\d+)\.", name)
    return int(m.group(1)) if m else None
