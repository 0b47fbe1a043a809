"""The synthetic world's base model: a tiny Llama pretrained by ftlab on procedural skills, cached by config.

`ensure_base(world)` returns a directory with a `save_pretrained` Llama (safetensors), its tokenizer and a
`world.json` (config, per-skill accuracy, wall time). The directory name is a hash of the world config and
`WORLD_VERSION`, so a config is built once per cache and rebuilt only when it (or the code's meaning) changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import pathlib
import platform
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from ftlab.utils.padding import pad_batch
from ftlab.utils.progress import Bar
from ftlab.world import skills as sk
from ftlab.world.tokenizer import build_tokenizer

# Bump whenever generation, tokenizer or training code changes what a given world config produces:
# it is part of the cache key, so stale base models are never reused.
WORLD_VERSION = 2

# Eager attention: on CPU, SDPA's backward made d=128 pretraining steps 2-3x slower (synthetic-world.md);
# at d=64 the two are on par (76 vs 79 ms per step, 1 thread).
ATTN_IMPL = "eager"
# At most this many intra-op threads while pretraining: the model is tiny (0.14 M parameters, batch 128 x
# ~19 tokens), so more threads mostly add synchronisation.
MAX_THREADS = 4
WEIGHT_DECAY = 0.01
# Init std of the weights. transformers' default 0.02 is tuned for wide models; at d=64 it left `add` on a
# plateau near 10 % for 1,500-2,400 steps in 3 of 6 runs. 0.06 learnt it by ~1,000 steps in 4 of 5 seeds;
# 0.1 by 600-800 steps in 3 of 3 (every default skill >= 97 % after 1,500 steps).
INIT_STD = 0.1
EVAL_N = 200  # test examples per skill in world.json


# -------------------------------------------------------------------------------------------------- config
def world_config(world: Any) -> dict:
    """The world config as a plain dict with every `WorldConfig` field (defaults filled in, types normalised).

    Accepts a dict, an OmegaConf node or a `WorldConfig`. Unknown keys are refused.
    """
    from ftlab.config.schema import WorldConfig

    if dataclasses.is_dataclass(world):
        world = dataclasses.asdict(world)
    elif not isinstance(world, Mapping):
        from omegaconf import OmegaConf

        world = OmegaConf.to_container(world, resolve=True)
    defaults = dataclasses.asdict(WorldConfig())
    unknown = sorted(set(world) - set(defaults))
    if unknown:
        raise ValueError(f"world config: unknown keys {unknown}; valid keys: {', '.join(defaults)}")
    cfg = {**defaults, **dict(world)}
    cfg["skills"] = list(cfg["skills"])
    for k in ("seed", "hidden_size", "num_layers", "num_heads", "intermediate_size", "steps", "batch_size",
              "warmup_steps"):
        cfg[k] = int(cfg[k])
    for k in ("rope_theta", "lr"):
        cfg[k] = float(cfg[k])
    bad = [s for s in cfg["skills"] if s not in sk.PRETRAIN_SKILLS]
    if bad or not cfg["skills"]:
        raise ValueError(f"world.skills: {cfg['skills']} must be a non-empty subset of {sk.PRETRAIN_SKILLS}")
    if cfg["precision"] not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"world.precision: {cfg['precision']!r}; valid: fp32, bf16, fp16")
    return cfg


def world_hash(world: Any) -> str:
    """Content address of a world config: 16 hex digits over the normalised config and `WORLD_VERSION`."""
    cfg = world_config(world)
    blob = json.dumps({"world": cfg, "version": WORLD_VERSION}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root(cache_dir: Optional[str | os.PathLike] = None) -> pathlib.Path:
    """`cache_dir`, else $FTLAB_CACHE, else $XDG_CACHE_HOME/ftlab, else ~/.cache/ftlab."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    if os.environ.get("FTLAB_CACHE"):
        return pathlib.Path(os.environ["FTLAB_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "ftlab"
    return pathlib.Path.home() / ".cache" / "ftlab"


def base_dir(world: Any, cache_dir: Optional[str | os.PathLike] = None) -> pathlib.Path:
    """Where `ensure_base` keeps the base model of `world` (whether or not it is built yet)."""
    return cache_root(cache_dir) / "world" / f"tiny-{world_hash(world)}"


# --------------------------------------------------------------------------------------------------- model
def build_model(world: Any, tokenizer=None):
    """A freshly initialised `LlamaForCausalLM` for `world` (seeded by ``world.seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = world_config(world)
    tok = tokenizer or build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_heads"],
        num_key_value_heads=cfg["num_heads"],
        max_position_embeddings=256,  # RoPE: no learned positions; prompts here are ~20 tokens
        rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]},
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        attn_implementation=ATTN_IMPL,
        initializer_range=INIT_STD,
    )
    torch.manual_seed(cfg["seed"])
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _num_threads() -> int:
    """Intra-op threads for pretraining: $FTLAB_WORLD_THREADS if set, else the usable cores, at most 4."""
    env = os.environ.get("FTLAB_WORLD_THREADS")
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_THREADS))


class _ThreadGovernor:
    """Chooses between N intra-op threads and 1 while pretraining, so a busy machine cannot stall it.

    Why: with 2 OpenMP threads on 2 cores, a step took ~38 ms on an idle machine but 0.9-2.5 s while another
    process kept one core busy (every parallel region waits for the descheduled thread), against ~65-110 ms
    for 1 thread. So every `every` steps, from step `at`, it runs `length` steps with the *other* thread
    count and keeps whichever was faster (median of recent steps). A stall between probes (N-thread steps
    `stall` x slower than their best) probes at once. While on 1 thread, failed probes of N threads back
    off (interval doubles) and last 2 steps: they are the slow ones.

    The thread count changes float summation order in some backward reductions (weights differ in the 7th
    digit). The probe schedule is fixed, so on an idle machine the mode never changes and the weights are
    identical from build to build; a switch (recorded in `switches`) only happens when the machine is busy.
    $FTLAB_WORLD_THREADS pins the count and turns the governor off.
    """

    def __init__(self, n: int, adaptive: bool, every: int = 250, at: int = 20, length: int = 4,
                 stall: float = 2.5):
        self.n, self.mode = n, n
        self.adaptive = adaptive and n > 1
        self.every, self.length, self.stall = every, length, stall
        self.next_probe, self.interval = at, every
        self.times: dict[int, list[float]] = {1: [], n: []}
        self.best: Optional[float] = None  # best median of 8 N-thread steps since the last probe
        self.switches: list[tuple[int, int]] = []  # (step, new thread count)

    def _probe_len(self) -> int:
        return self.length if self.mode == self.n else 2

    def _in_probe(self, step: int) -> bool:
        return self.next_probe <= step < self.next_probe + self._probe_len()

    def threads_for(self, step: int) -> int:
        if not self.adaptive:
            return self.n
        if self._in_probe(step):
            return 1 if self.mode == self.n else self.n
        return self.mode

    def record(self, step: int, threads: int, seconds: float) -> None:
        if not self.adaptive:
            return
        t = self.times[threads]
        t.append(seconds)
        del t[:-8]
        if not self._in_probe(step):
            if self.mode == self.n and len(t) == 8:
                m = sorted(t)[4]
                self.best = m if self.best is None else min(self.best, m)
                if m > self.stall * self.best and step + 1 < self.next_probe:
                    self.next_probe = step + 1  # stalled: probe 1 thread now rather than at the next slot
            return
        if step != self.next_probe + self._probe_len() - 1:
            return
        med = {k: sorted(v)[len(v) // 2] for k, v in self.times.items() if v}
        best = min(med, key=med.get) if len(med) == 2 else self.mode
        if best != self.mode:
            self.mode = best
            self.switches.append((step + 1, best))
            self.interval = self.every
        elif self.mode != self.n:
            self.interval *= 2  # N threads still stalled: probe less often
        self.best = None  # relearn the N-thread baseline after every probe
        self.next_probe += self.interval


def _autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast("cpu", dtype=torch.float16)
    return contextlib.nullcontext()


class _Batcher:
    """Turns the example stream into (inputs, targets) tensors for `<s> prompt response </s>`, right-padded.

    inputs are the sequence without its final `</s>` (nothing follows it to predict); targets[t] is the token
    input t should predict, or -100 where no loss is taken (prompt, pad).
    """

    def __init__(self, tokenizer, skills, seed: int):
        self.vocab = tokenizer.get_vocab()
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.stream = sk.sample_stream(skills, seed=seed, split="train")

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.vocab
        rows, tgts = [], []
        for _ in range(batch_size):
            prompt, response = next(self.stream)
            p = [self.bos] + [v[c] for c in prompt]
            r = [v[c] for c in response] + [self.eos]
            # The last prompt token (`=`) predicts the first response token, ..., the last one predicts </s>.
            rows.append(p + r[:-1])
            tgts.append([-100] * (len(p) - 1) + r)
        return pad_batch(rows, self.pad), pad_batch(tgts, -100)  # right padding (rows and targets: same lengths)


def _lr_at(step: int, cfg: dict) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to 0 at `steps`."""
    warm, total = cfg["warmup_steps"], cfg["steps"]
    if step < warm:
        return cfg["lr"] * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def pretrain(world: Any, progress: bool = True, tokenizer=None, log_every: int = 25,
             callback: Optional[Callable[[int, Any], None]] = None, callback_every: int = 0) -> tuple[Any, dict]:
    """Pretrain a fresh base model on `world`'s skills in memory (no caching; see `ensure_base`).

    `callback(step, model)` runs every `callback_every` steps (and must not touch the RNGs it does not own).

    Returns:
        (model in eval mode, stats dict with ``steps``, ``final_loss``, ``train_s``, ``n_params``).
    """
    cfg = world_config(world)
    tok = tokenizer or build_tokenizer()
    gov = _ThreadGovernor(_num_threads(), adaptive=not os.environ.get("FTLAB_WORLD_THREADS"))
    with _threads(gov.n):
        model = build_model(cfg, tok)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-8,
        )
        batches = _Batcher(tok, cfg["skills"], cfg["seed"])
        torch.manual_seed(cfg["seed"])
        t0 = time.perf_counter()
        loss_ema = None
        with Bar(cfg["steps"], "[bold]pretraining tiny world", "loss {task.fields[loss]:.4f}", enabled=progress,
                 loss=float("nan")) as bar:
            for step in range(cfg["steps"]):
                n = gov.threads_for(step)
                if n != torch.get_num_threads():
                    torch.set_num_threads(n)
                t_step = time.perf_counter()
                x, y = batches(cfg["batch_size"])  # [B, T] token ids, [B, T] targets (-100: no loss)
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, cfg)
                with _autocast(cfg["precision"]):
                    logits = model(input_ids=x).logits  # [B, T, V]
                loss = torch.nn.functional.cross_entropy(
                    logits.float().flatten(0, 1), y.flatten(), ignore_index=-100
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                gov.record(step, n, time.perf_counter() - t_step)
                if callback is not None and callback_every and (step + 1) % callback_every == 0:
                    callback(step + 1, model)
                    model.train()
                if step % log_every == 0 or step == cfg["steps"] - 1:
                    v = loss.item()
                    loss_ema = v if loss_ema is None else 0.7 * loss_ema + 0.3 * v
                    bar.update(completed=step + 1, loss=loss_ema)
        train_s = time.perf_counter() - t0
    model.eval()
    stats = {
        "steps": cfg["steps"],
        "final_loss": loss_ema,
        "train_s": round(train_s, 2),
        "n_params": sum(p.numel() for p in model.parameters()),
        "num_threads": gov.n,
        "thread_switches": [list(x) for x in gov.switches],  # [step, threads]; empty on an idle machine
        "final_threads": gov.mode,
    }
    return model, stats




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
    with _threads(stats["final_threads"]):  # what the governor found fastest on this machine just now
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
            f"tiny world built in {info['wall_s']:.1f} s: worst skill {worst} {info['accuracy'][worst]:.1f} % "
            f"({out.parent / name})"
        )
    # world.json last: its presence marks a complete build.
    (out / "world.json").write_text(json.dumps(info, indent=2) + "\n")


def load_base(world: Any, cache_dir: Optional[str | os.PathLike] = None, progress: bool = True):
    """(model, tokenizer) of `world`'s base model, building it if needed. Model in eval mode, fp32, CPU."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    d = ensure_base(world, cache_dir=cache_dir, progress=progress)
    model = LlamaForCausalLM.from_pretrained(d, attn_implementation=ATTN_IMPL)
    model.eval()
    return model, AutoTokenizer.from_pretrained(d)
