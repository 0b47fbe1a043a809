"""Sparse updates of chosen weight entries with the pretrained weight W frozen (LIFT, S2FT).

Unstructured entries (LIFT): each target weight gets a torch parametrization holding one trained vector `delta`
(one entry per chosen position of W, flat row-major indices) and the index buffer, W_eff = W + scatter(delta).
- only the chosen entries can change, by construction (no gradient mask to keep consistent);
- AdamW keeps moments for the chosen entries only: the optimizer state is 2 x (number of chosen entries)
  floats, not 2 x |W| (the gradient of W itself is still formed densely, transiently, in backward);
- L2-SP anchors the deltas at 0, i.e. pulls exactly the chosen entries back to their pretrained values.
Whole rows or columns (S2FT, `SliceDelta`): a trained dense block beside the frozen linear, added to its output by a
forward hook: rows R, y[..., R] += x @ D^T; columns C, y += x[..., C] @ D^T. Backward forms only D's gradient from
the selected slice of the output gradient or of the input (partial back-propagation, the paper's compute and memory
saving: no dense gradient of W, and only x[..., C] is kept for it), not the W-sized gradient the parametrization forms.
Either way the export folds the deltas into W and saves a plain model (`save_pretrained` with the merged state
dict). A private module (it subclasses nn.Module at import): lift.py and s2ft.py import it inside their hooks, and
method discovery skips it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize


class SparseDelta(nn.Module):
    """Parametrization W -> W + delta scattered at the flat positions `index`."""

    def __init__(self, index: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index.to(weight.device, torch.long), persistent=False)
        self.delta = nn.Parameter(torch.zeros(index.numel(), dtype=weight.dtype, device=weight.device))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(-1).index_add(0, self.index, self.delta.to(w.dtype)).view_as(w)


def attach(model: nn.Module, selection: dict[str, torch.Tensor]) -> None:
    """Freeze every parameter of `model`; give each module named in `selection` ({module name: flat indices
    into its weight}) a trained SparseDelta."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, index in selection.items():
        module = model.get_submodule(name)
        parametrize.register_parametrization(module, "weight", SparseDelta(index, module.weight))
        module.parametrizations.weight.original.requires_grad_(False)


class SliceDelta(nn.Module):
    """A trained block D on whole rows (`axis` 0: D is [len(index), d_in]) or whole columns (`axis` 1: D is
    [d_out, len(index)]) of a frozen linear's weight; `attach_slices` adds its term to the linear's output."""

    def __init__(self, index: torch.Tensor, weight: torch.Tensor, axis: int):
        super().__init__()
        self.axis = axis
        self.register_buffer("index", index.to(weight.device, torch.long), persistent=False)
        shape = (index.numel(), weight.shape[1]) if axis == 0 else (weight.shape[0], index.numel())
        self.delta = nn.Parameter(torch.zeros(shape, dtype=weight.dtype, device=weight.device))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = self.delta.to(x.dtype)
        if self.axis == 0:
            return y.index_add(-1, self.index, nn.functional.linear(x, d).to(y.dtype))
        return y + nn.functional.linear(x.index_select(-1, self.index), d).to(y.dtype)

    @torch.no_grad()
    def dense(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight change as a [d_out, d_in] matrix."""
        out = torch.zeros_like(weight)
        return out.index_copy(self.axis, self.index, self.delta.to(out.dtype))


def _slice_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.s2ft(inputs[0], output)


def attach_slices(model: nn.Module, selection: dict[str, tuple[int, torch.Tensor]]) -> None:
    """Freeze every parameter of `model`; give each linear named in `selection` ({module name: (axis, rows or
    columns)}) a trained SliceDelta as its child `s2ft` (parameter `<module>.s2ft.delta`)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (axis, index) in selection.items():
        module = model.get_submodule(name)
        module.s2ft = SliceDelta(index, module.weight, axis)
        module.register_forward_hook(_slice_hook)


def slices(model: nn.Module) -> dict[str, SliceDelta]:
    return {name[: -len(".s2ft")]: m for name, m in model.named_modules() if isinstance(m, SliceDelta)}


def deltas(model: nn.Module) -> dict[str, SparseDelta]:
    """{module name: its SparseDelta} of every parametrized module."""
    out = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, SparseDelta):
                    out[name] = p
    return out


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with the deltas folded in, under the plain names (`<module>.weight`)."""
    sd = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k and ".s2ft." not in k}
    with torch.no_grad():
        for name in deltas(model):
            sd[f"{name}.weight"] = model.get_submodule(name).weight.detach().clone()
        for name, sl in slices(model).items():
            w = model.get_submodule(name).weight.detach()
            sd[f"{name}.weight"] = w + sl.dense(w)
    return sd


def export_merged(model: nn.Module, out_dir: Path) -> None:
    """A plain HF model directory (same architecture, deltas folded in) that reloads with the same logits."""
    model.save_pretrained(out_dir, state_dict=merged_state_dict(model), safe_serialization=True)


@torch.no_grad()
def move_support(module: nn.Module, new_index: torch.Tensor, optimizer: torch.optim.Optimizer | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-select the trained entries of `module`'s SparseDelta (LIFT's mask update), keeping W_eff unchanged.

    `new_index`: sorted flat positions, as many as now. Entries in both the old and the new support keep their
    delta and their optimizer moments (the same Parameter, its values moved to their new slots); entries that
    leave the support are folded into the frozen original weight (their trained change stays, they stop training);
    entries that join start at delta 0 with zero moments. The optimizer's `step` counter is kept (as the LIFT
    reference's SparseAdamW does). Returns the folded (positions, values)."""
    sd = next(p for p in module.parametrizations.weight if isinstance(p, SparseDelta))
    original = module.parametrizations.weight.original
    old, new = sd.index, new_index.to(sd.index.device, torch.long)
    if new.numel() != old.numel():
        raise ValueError(f"move_support: the support must keep its size ({old.numel()}), got {new.numel()}")
    keep_old, keep_new = torch.isin(old, new), torch.isin(new, old)  # both sorted: kept entries align in order
    gone, gone_vals = old[~keep_old], sd.delta[~keep_old].detach().clone()
    original.view(-1).index_add_(0, gone, gone_vals.to(original.dtype))

    def moved(v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(v)
        out[keep_new] = v[keep_old]
        return out

    sd.delta.copy_(moved(sd.delta))
    if optimizer is not None:
        state = optimizer.state.get(sd.delta, {})
        for k, v in list(state.items()):
            if isinstance(v, torch.Tensor) and v.shape == sd.delta.shape:
                state[k] = moved(v)
    sd.index = new
    return gone, gone_vals


def selection_summary(model: nn.Module) -> dict:
    ds = deltas(model)
    chosen = sum(d.index.numel() for d in ds.values())
    total = sum(model.get_submodule(n).parametrizations.weight.original.numel() for n in ds)
    for n, sl in slices(model).items():
        chosen += sl.delta.numel()
        total += model.get_submodule(n).weight.numel()
    return {"matrices": len(ds) + len(slices(model)), "entries": chosen, "of": total,
            "density": chosen / total if total else 0.0}
