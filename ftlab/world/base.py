"""The synthetic world's base model: a tiny Llama pretrained by ftlab on procedural skills, cached by config.

`ensure_base(world)` returns a directory with a `save_pretrained` Llama (safetensors), its tokenizer and a
`world.json` (config, per-skill accuracy, wall time). The directory name is a hash of the world config and
`WORLD_VERSION`, so a config is built once per cache and rebuilt only when it (or the code's meaning) changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pathlib
import platform
import shutil
import tempfile
import time
from typing import Any, Optional

import torch

from ftlab.utils.files import cache_root
from ftlab.world import skills as sk
from ftlab.world.model import ATTN_IMPL, world_config
from ftlab.world.pretrain import THREADS, _threads, pretrain
from ftlab.world.tokenizer import build_tokenizer

# Bump whenever generation, tokenizer or training code changes what a given world config produces:
# it is part of the cache key, so stale base models are never reused.
WORLD_VERSION = 3  # 3: pretraining pinned to one thread (ftlab.world.pretrain.THREADS)

EVAL_N = 200  # test examples per skill in world.json


# -------------------------------------------------------------------------------------------------- config


def world_hash(world: Any) -> str:
    """Content address of a world config: 16 hex digits over the normalised config and `WORLD_VERSION`."""
    cfg = world_config(world)
    blob = json.dumps({"world": cfg, "version": WORLD_VERSION}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def base_dir(world: Any, cache_dir: Optional[str | os.PathLike] = None) -> pathlib.Path:
    """Where `ensure_base` keeps the base model of `world` (whether or not it is built yet)."""
    return cache_root(cache_dir) / "world" / f"{world_config(world)['size']}-{world_hash(world)}"


# --------------------------------------------------------------------------------------------------- model


# ---------------------------------------------------------------------------------------------- evaluation
def skill_accuracy(model, tokenizer, skill: str, n: int = EVAL_N, seed: int = 0, batch_size: int = 64) -> float:
    """Exact-match accuracy (points, 0-100) of greedy decoding on `n` test examples of `skill`."""
    from ftlab.models.generate import greedy_decode

    exs = sk.make_examples(skill, "test", n, seed=seed)
    if not exs:
        return float("nan")
    max_new = max(len(e["response"]) for e in exs) + 1  # + </s>
    outs = greedy_decode(model, tokenizer, [e["prompt"] for e in exs], max_new_tokens=max_new,
                         batch_size=batch_size)
    return 100.0 * sum(o == e["response"] for o, e in zip(outs, exs)) / len(exs)


def world_accuracy(model, tokenizer, skills=None, n: int = EVAL_N, seed: int = 0,
                   batch_size: int = 256) -> dict[str, float]:
    """`skill_accuracy` for each skill (default: all pretraining and target skills)."""
    skills = sk.ALL_SKILLS if skills is None else skills
    return {s: skill_accuracy(model, tokenizer, s, n=n, seed=seed, batch_size=batch_size) for s in skills}


# ------------------------------------------------------------------------------------------------- caching
def ensure_base(world: Any, cache_dir: Optional[str | os.PathLike] = None, progress: bool = True) -> pathlib.Path:
    """The directory of `world`'s pretrained base model, building it first if the cache lacks it.

    The directory holds ``config.json``, ``model.safetensors``, the tokenizer files and ``world.json``.
    It is built in a temporary directory beside it and renamed into place, under an exclusive `flock` on
    ``<name>.lock``: a second process asking for the same world waits, then reuses the first one's build.

    Args:
        world: the world config (dict, OmegaConf node or `ftlab.config.schema.WorldConfig`); missing keys take
            their `WorldConfig` defaults.
        cache_dir: cache root; default $FTLAB_CACHE, else ~/.cache/ftlab.
        progress: show a progress bar while pretraining.
    """
    cfg = world_config(world)
    final = base_dir(cfg, cache_dir)
    if (final / "world.json").is_file():
        return final  # fast path: built (the rename made it visible complete)
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if (final / "world.json").is_file():
                return final  # another process built it while we waited
            if final.exists():  # left incomplete by something other than this code; rebuild
                shutil.rmtree(final)
            # Holding the lock, no one else is building this world: leftovers are from a killed build.
            for stale in final.parent.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
            try:
                _build(cfg, tmp, progress, final.name)
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a built world is for everyone
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return final


def _build(cfg: dict, out: pathlib.Path, progress: bool, name: str) -> None:
    import transformers

    t0 = time.perf_counter()
    tok = build_tokenizer()
    model, stats = pretrain(cfg, progress=progress, tokenizer=tok)
    t_eval = time.perf_counter()
    with _threads(THREADS):
        acc = world_accuracy(model, tok, skills=list(cfg["skills"]) + list(sk.TARGET_SKILLS))
    eval_s = time.perf_counter() - t_eval
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    info = {
        "world": cfg,
        "world_version": WORLD_VERSION,
        "hash": world_hash(cfg),
        "accuracy": {s: acc[s] for s in cfg["skills"]},
        "target_accuracy": {s: acc[s] for s in sk.TARGET_SKILLS},  # before fine-tuning: should be ~0
        "min_accuracy": min(acc[s] for s in cfg["skills"]),
        "eval_n": EVAL_N,
        **stats,
        "eval_s": round(eval_s, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if progress:
        from rich.console import Console

        worst = min(info["accuracy"], key=info["accuracy"].get)
        Console(stderr=True).print(
            f"{cfg['size']} world built in {info['wall_s']:.1f} s: worst skill {worst} {info['accuracy'][worst]:.1f} % "
            f"({out.parent / name})"
        )
    # world.json last: its presence marks a complete build.
    (out / "world.json").write_text(json.dumps(info, indent=2) + "\n")


def load_base(world: Any, cache_dir: Optional[str | os.PathLike] = None, progress: bool = True):
    """(model, tokenizer) of `world`'s base model, building it if needed. Model in eval mode, fp32, CPU."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    d = ensure_base(world, cache_dir=cache_dir, progress=progress)
    model = LlamaForCausalLM.from_pretrained(d, attn_implementation=ATTN_IMPL, use_kernels=False)  # see models.loading
    model.eval()
    return model, AutoTokenizer.from_pretrained(d)
