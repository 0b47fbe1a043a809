"""Training-state checkpoints for exact resume (issue 5).

A checkpoint is a directory `checkpoints/step_NNNNNN/` holding everything the loop needs to continue bit for
bit from the end of step N:

- `weights.safetensors`  every parameter the optimizer may update (the adapter for adapter methods, the whole
                         model for `full`, every candidate block for LISA), by parameter name;
- `optimizer.pt`, `scheduler.pt`  the state dicts (torch.save; read back with `torch.load(weights_only=True)`);
- `rng.pt`               python `random`, NumPy, torch CPU (and CUDA when present) generator states, stored as
                         tensors and plain numbers so `weights_only=True` loads them;
- `method.pt`            the method's own state (`Method.state_dict()`, e.g. LISA's sampler and active blocks);
- `reg.pt`               the regulariser's state (`Regulariser.state_dict()`, e.g. which L2-SP anchors exist);
- `probes.pt`            (runs with eval.probe_every > 0) the in-training probes' base reference
                         (`ftlab.eval.probes.Probes.state_dict()`): a resumed run's KL is against the same numbers;
- `state.json`           step, data position (epoch, index; the permutation of an epoch is derived from
                         seed + epoch), the loss-window accumulators, tokens so far, the elapsed time, the
                         sha256 of the run's config.yaml and of its input files (`inputs`: a resume on changed
                         data is refused), and the sha256 of every file above;
- `config.yaml`          the run config the checkpoint was taken under (to name what changed on a refusal);
- `COMPLETE`             written last. A directory without it is never used.

The directory is written as `step_NNNNNN.tmp` and renamed into place; the last `train.keep_checkpoints` are
kept. The training curve so far is metrics.jsonl itself: on resume it is cut back to the checkpoint's step.

Test-only switch: the environment variable FTLAB_RESUME_DROP (comma-separated: weights, optimizer, scheduler,
rng, data, method, reg) makes `restore` skip that component. tests/test_resume.py uses it to show that each
component is needed; never set it otherwise.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ftlab.methods.base import Method
from ftlab.rundir.identity import (  # noqa: F401 - ResumeRefused, config_sha256 re-exported
    ResumeRefused,
    changed_inputs,
    config_changes,
    config_sha256,
    input_digests,
    run_dir_config,
)
from ftlab.train.errors import NonFiniteLoss
from ftlab.utils.files import COMPLETE, atomic_dir, fsync_dir, fsync_file, sha256_file  # noqa: F401

FORMAT = 1
STATE = "state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPONENTS = ("weights", "optimizer", "scheduler", "rng", "data", "method", "reg")
_DROP_ENV = "FTLAB_RESUME_DROP"  # test-only, see the module docstring


# ------------------------------------------------------------------------------------------------ helpers






def trainable_named(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter the optimizer holds or that requires grad, by name (tied parameters once)."""
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return {n: p for n, p in model.named_parameters() if p.requires_grad or id(p) in in_opt}


# -------------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    import numpy as np

    _, py_key, py_gauss = random.getstate()
    _, np_key, np_pos, np_has_gauss, np_cached = np.random.get_state()
    out = {
        "python": torch.tensor(py_key, dtype=torch.int64),
        "python_gauss": [py_gauss is not None, float(py_gauss or 0.0)],
        "numpy": torch.from_numpy(np.asarray(np_key, dtype=np.int64).copy()),
        "numpy_rest": [int(np_pos), int(np_has_gauss), float(np_cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict) -> None:
    import numpy as np

    has_gauss, gauss = s["python_gauss"]
    random.setstate((3, tuple(int(x) for x in s["python"].tolist()), float(gauss) if has_gauss else None))
    pos, np_has_gauss, cached = s["numpy_rest"]
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), int(pos), int(np_has_gauss),
                         float(cached)))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ------------------------------------------------------------------------------------------------- save
def _optimizer_state(model: nn.Module, optimizer) -> dict:
    """optimizer.state_dict(); for FSDP2-sharded models the whole (gathered) state, keyed by parameter name."""
    from ftlab.train import distributed as dist

    sd = optimizer.state_dict()
    if not dist.is_sharded(model):
        return sd
    # the same layout as one process's state_dict, each sharded moment gathered whole (every rank, same order)
    return {**sd, "state": {i: {k: dist.full_tensor(v).cpu() if hasattr(v, "full_tensor") else v
                                for k, v in st.items()} for i, st in sorted(sd["state"].items())}}


def _reshard_optimizer_state(optimizer) -> None:
    """After load_state_dict of whole tensors: shard each moment like its (DTensor) parameter again."""
    from torch.distributed.tensor import distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for k, v in list(st.items()):
                if hasattr(p, "device_mesh") and torch.is_tensor(v) and not hasattr(v, "full_tensor") \
                        and tuple(v.shape) == tuple(p.shape):
                    st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)


def save_state(path: Path, *, model: nn.Module, optimizer, scheduler, method, batches, run_dir: Path,
               progress: dict, reg=None, probes=None) -> None:
    """Write one training-state checkpoint atomically: temp dir, fsync, COMPLETE last, rename."""
    from ftlab.train import distributed as dist

    # Several processes: every rank takes part in gathering (sharded weights and optimizer state, each rank's
    # RNG); rank 0 alone writes.
    named = {n: dist.full_tensor(p.detach()) for n, p in trainable_named(model, optimizer).items()}
    opt_state = _optimizer_state(model, optimizer)
    rngs = dist.gather_objects(rng_state())
    if not dist.is_main():
        return
    bad = [n for n, p in named.items() if not torch.isfinite(p).all()]
    if bad:
        from ftlab.train.errors import NonFiniteLoss

        raise NonFiniteLoss(f"non-finite weights in {bad[:3]}; checkpoint not written")
    with atomic_dir(path) as tmp:
        _write_state(tmp, named, opt_state, rngs, scheduler, method, reg, probes, batches, run_dir, progress)


def _write_state(tmp: Path, named, opt_state, rngs, scheduler, method, reg, probes, batches, run_dir: Path,
                 progress: dict) -> None:
    from safetensors.torch import save_file

    save_file({n: p.detach().to("cpu").contiguous().clone() for n, p in named.items()},
              str(tmp / "weights.safetensors"))
    torch.save(opt_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rngs[0] if len(rngs) == 1 else {"ranks": rngs}, tmp / "rng.pt")
    torch.save(method.state_dict(), tmp / "method.pt")
    torch.save(reg.state_dict() if reg is not None else {}, tmp / "reg.pt")
    if probes is not None:
        torch.save(probes.state_dict(), tmp / "probes.pt")
    cfg = Path(run_dir) / "config.yaml"
    if cfg.is_file():
        shutil.copyfile(cfg, tmp / "config.yaml")
    files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
    state = {"format": FORMAT, **progress, "data": batches.position, "world_size": len(rngs),
             "config_sha256": config_sha256(run_dir), "inputs": input_digests(run_dir_config(run_dir) or {}),
             "files": files}
    (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")




def _remove(d: Path) -> None:
    """Rename out of the `step_N` namespace first (atomic), then delete: a kill mid-delete leaves a `.del`
    directory, never a half-deleted `step_N`."""
    trash = d.with_name(d.name + ".del")
    shutil.rmtree(trash, ignore_errors=True)
    d.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete step checkpoints; drop older ones, step dirs without a COMPLETE marker
    (only a killed writer leaves those) and leftover temp / trash dirs."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return
    for d in [*ckpt_dir.glob("step_*.tmp"), *ckpt_dir.glob("step_*.del")]:
        shutil.rmtree(d, ignore_errors=True)
    complete = complete_checkpoints(ckpt_dir)
    for d in ckpt_dir.iterdir():
        if _STEP_DIR.match(d.name) and d.is_dir() and d not in complete:
            _remove(d)
    for d in complete[:-keep] if keep > 0 else []:
        _remove(d)


# ------------------------------------------------------------------------------------------------- find
def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Step checkpoints with a COMPLETE marker, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for d in ckpt_dir.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / COMPLETE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


@dataclass
class Loaded:
    path: Path
    state: dict
    weights: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict
    method: dict
    reg: dict
    drop: set[str] = field(default_factory=set)
    probes: dict = field(default_factory=dict)  # empty: the run had no probes (or an older checkpoint)

    @property
    def step(self) -> int:
        return int(self.state["step"])


def load_state(path: Path) -> Loaded:
    """Read and verify one checkpoint (hashes of every file); raises on anything missing or corrupt."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path}: no {COMPLETE} marker")
    state = json.loads((path / STATE).read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT}")
    for name, digest in state["files"].items():
        if sha256_file(path / name) != digest:
            raise ValueError(f"{path / name}: sha256 does not match the checkpoint's state.json")

    def pt(name):
        return torch.load(path / name, map_location="cpu", weights_only=True)

    drop = {c.strip() for c in os.environ.get(_DROP_ENV, "").split(",") if c.strip()}
    unknown = drop - set(COMPONENTS)
    if unknown:
        raise ValueError(f"{_DROP_ENV}: unknown component(s) {sorted(unknown)}; valid: {', '.join(COMPONENTS)}")
    return Loaded(path=path, state=state, weights=load_file(str(path / "weights.safetensors")),
                  optimizer=pt("optimizer.pt"), scheduler=pt("scheduler.pt"), rng=pt("rng.pt"),
                  method=pt("method.pt"), reg=pt("reg.pt"), drop=drop,
                  probes=pt("probes.pt") if (path / "probes.pt").is_file() else {})


def latest(run_dir: Path) -> Loaded | None:
    """The newest checkpoint that loads and verifies; a rejected one is reported on stderr and skipped."""
    for d in reversed(complete_checkpoints(Path(run_dir) / "checkpoints")):
        try:
            return load_state(d)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
            print(f"ftlab: checkpoint {d} rejected ({type(e).__name__}: {e}); trying an older one",
                  file=sys.stderr)
    return None


# ------------------------------------------------------------------------------------------------ checks
def check_same_config(ck: Loaded, run_dir: Path) -> None:
    """Refuse to resume when config.yaml differs from the one the checkpoint was taken under, or when the content
    of an input file differs from its digest in the checkpoint's state.json (`inputs`)."""
    current = config_sha256(run_dir)
    if ck.state.get("config_sha256") != current:
        saved = ck.path / "config.yaml"
        changes = (config_changes(saved.read_text(), (Path(run_dir) / "config.yaml").read_text())
                   if saved.is_file() else ["(the checkpoint holds no config.yaml)"])
        if changes:  # none: same values, different text (formatting): the same config
            raise ResumeRefused(
                f"{run_dir}: refusing to resume from {ck.path.name}: the config changed since it was written: "
                + "; ".join(changes) + ". Restore the config, or start the run in a new directory.")
    changed = changed_inputs(ck.state.get("inputs"), run_dir_config(run_dir) or {})
    if changed:
        raise ResumeRefused(
            f"{run_dir}: refusing to resume from {ck.path.name}: input file(s) changed since it was written: "
            + "; ".join(changed) + ". Its weights were trained on the old content; restore the file(s) to resume, "
            "or train the new content in a new directory (`ftlab run` names one by the files' content).")


# ----------------------------------------------------------------------------------------------- restore
def restore(ck: Loaded, *, model: nn.Module, optimizer, scheduler, method, batches, reg=None,
            probes=None) -> dict:
    """Put the checkpoint's state into freshly built objects (model prepared, optimizer and scheduler
    constructed); returns the loop's progress counters. RNG is set last, right before training continues."""
    from ftlab.train import distributed as dist

    rank, world, _ = dist.world()
    saved_world = int(ck.state.get("world_size", 1))
    if saved_world != world:
        raise ResumeRefused(f"{ck.path}: written by {saved_world} process(es), resumed on {world}: the data split, "
                            f"RNG streams and sharding depend on the world size; resume with hw.nproc x hw.nnodes = "
                            f"{saved_world}, or start a new run")
    drop = ck.drop
    if "method" not in drop:
        method.load_state_dict(ck.method, model)
    if reg is not None and "reg" not in drop:
        reg.load_state_dict(ck.reg, model)  # before the weights: L2-SP anchors are the untrained values
    sharded = dist.is_sharded(model)
    if "weights" not in drop and sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        set_model_state_dict(model, ck.weights, options=StateDictOptions(full_state_dict=True, strict=False))
    elif "weights" not in drop:
        params = dict(model.named_parameters())
        missing = [n for n in ck.weights if n not in params]
        if missing:
            raise ValueError(f"{ck.path}: checkpoint has parameters the model lacks: {missing[:3]}")
        with torch.no_grad():
            for n, t in ck.weights.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))
    if "optimizer" not in drop:
        optimizer.load_state_dict(ck.optimizer)
        if sharded:
            _reshard_optimizer_state(optimizer)
    if "scheduler" not in drop:
        scheduler.load_state_dict(ck.scheduler)
    if "data" not in drop:
        batches.set_position(**ck.state["data"])
    if probes is not None:
        probes.load_state_dict(ck.probes)  # the base reference the run started with (empty: keep the rebuilt one)
    if "rng" not in drop:
        set_rng_state(ck.rng["ranks"][rank] if "ranks" in ck.rng else ck.rng)
    keys = ("step", "tokens", "window_loss", "window_n", "window_reg", "loss_value", "elapsed_s")
    return {k: ck.state[k] for k in keys}


def truncate_curve(path: Path, step: int) -> None:
    """Drop metrics.jsonl rows logged after `step` (and a torn last line), atomically."""
    from ftlab.utils.files import atomic_write_text

    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            keep.append(line + "\n")
    atomic_write_text(path, "".join(keep))


def save_checkpoint(model: nn.Module, method: Method, path: Path) -> None:
    """Export the method's weights atomically (ftlab.utils.files.atomic_dir); never a checkpoint with NaN weights."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteLoss(f"non-finite weights in {bad[:3]}; checkpoint not written")
    with atomic_dir(path) as tmp:
        method.export(model, tmp)
