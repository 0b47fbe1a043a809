"""Model and tokenizer loading and weight fingerprints (the hub reachability probe is ftlab.models.hub).

`model.name_or_path` is one of
- ``tiny``: the embedded world's base model, built (or found in its cache) by `ftlab.world.base.ensure_base`;
- a local directory written by ``save_pretrained`` (config.json, tokenizer files, ``*.safetensors``);
- a Hugging Face hub id (``Qwen/Qwen2.5-0.5B``), downloaded into / read from the usual HF cache.

Hub access never hangs. Without ``HF_HUB_OFFLINE=1`` each hub call of transformers/datasets retries for ~23 s
when the network is closed, so before any hub call `hub_status` makes one short TCP connection to the hub
endpoint (``huggingface_hub.constants.ENDPOINT``, or the HTTPS proxy if one is configured), 2.5 s at most,
DNS included. When the offline variables are set, or the probe fails, the load runs in offline mode (hub
libraries switched to offline for the duration of the call): whatever the local HF cache holds still loads,
anything else raises `HubUnavailable` at once, naming what was asked for and the local-file override.

Only ``*.safetensors`` weights are loaded: a directory holding only pickle checkpoints (``pytorch_model.bin``,
``*.pt``) is refused, because unpickling can run arbitrary code. ``trust_remote_code`` is passed through from
the config and never turned on by ftlab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Optional, Union

from ftlab.config.schema import ModelConfig
from ftlab.models.hub import HubUnavailable, hub_offline, hub_status
from ftlab.utils.files import sha256_file

__all__ = [
    "load_model_and_tokenizer",
    "load_tokenizer",
    "load_model",
    "resolve_local_dir",
    "model_fingerprint",
]

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ------------------------------------------------------------------------------------------------ hub probe


# ------------------------------------------------------------------------------------------------- loading
def _torch_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
    if name not in table:
        raise ValueError(f"model.dtype: unknown value {name!r}; valid choices: {', '.join(table)}")
    return table[name]


def _looks_like_path(s: str) -> bool:
    # "org/name" is a hub id; "./x", "/x", "~/x" and "a/b/c" are paths (the rule of ftlab.config.schema).
    return s.startswith((".", "/", "~")) or s.count("/") >= 2


def check_model_dir(path: Union[str, Path]) -> Path:
    """A local model directory ready to load: config.json and safetensors weights. Clear errors otherwise."""
    d = Path(path).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(
            f"model.name_or_path: local directory {str(d)!r} does not exist; give a directory written by "
            "save_pretrained (config.json, tokenizer files, *.safetensors) or a hub id like 'Qwen/Qwen2.5-0.5B'"
        )
    files = sorted(p.name for p in d.iterdir())
    shown = ", ".join(files[:20]) + (" ..." if len(files) > 20 else "") or "(empty)"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(
            f"model.name_or_path: {str(d)!r} has no config.json, so it is not a transformers model directory "
            f"(files there: {shown}); save the model with save_pretrained(dir)"
        )
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in files):
        return d
    pickles = [n for n in files if n.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(
            f"model.name_or_path: {str(d)!r} holds only pickle weights ({', '.join(pickles)}); ftlab loads "
            "*.safetensors only, because unpickling a checkpoint can run arbitrary code. If you trust the file, "
            "convert it once: AutoModelForCausalLM.from_pretrained(dir, use_safetensors=False)"
            ".save_pretrained(new_dir), and point model.name_or_path at new_dir"
        )
    raise FileNotFoundError(
        f"model.name_or_path: {str(d)!r} has config.json but no weights (*.safetensors); files there: {shown}"
    )


def resolve_local_dir(cfg: ModelConfig) -> Optional[Path]:
    """The local directory `cfg` loads from: the built world for ``tiny``, the directory itself for a path;
    None for a hub id."""
    if cfg.name_or_path == "tiny":
        if cfg.world is None:
            raise ValueError("model.world: model.name_or_path=tiny needs a world section (use model=tiny)")
        from ftlab.world.base import (
            ensure_base,  # lazy: the world pulls in its own machinery
        )

        progress = os.environ.get("FTLAB_PROGRESS", "1") != "0"
        return Path(ensure_base(dataclasses.asdict(cfg.world), progress=progress))
    p = Path(cfg.name_or_path).expanduser()
    if p.is_dir() or _looks_like_path(cfg.name_or_path):
        return p
    return None


class _Source:
    """Where `cfg` loads from: a local directory (checked), or a hub id (online, or from the local HF cache)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        local = resolve_local_dir(cfg)
        self.kwargs: dict[str, Any] = dict(trust_remote_code=bool(cfg.trust_remote_code))
        self.local = local is not None
        if local is not None:
            self.name, self.online, self.why = str(check_model_dir(local)), True, ""
            return  # a directory has no revisions
        self.name = cfg.name_or_path
        self.kwargs["revision"] = cfg.revision
        self.online, self.why = hub_status()
        if not self.online:
            # Decide before importing transformers' auto classes (seconds on a cold start).
            from huggingface_hub import try_to_load_from_cache

            try:
                hit = try_to_load_from_cache(self.name, "config.json", revision=cfg.revision)
            except Exception:  # an id the hub would refuse anyway (bad characters, ...)
                hit = None
            if not isinstance(hit, str):
                raise self.unavailable()
        self.kwargs["local_files_only"] = not self.online

    def unavailable(self) -> HubUnavailable:
        cfg = self.cfg
        return HubUnavailable(
            f"model: cannot load {self.name!r}"
            + (f" (revision {cfg.revision!r})" if cfg.revision else "")
            + f": {self.why}, and the local Hugging Face cache does not hold it. Point ftlab at a local copy: "
            "model.name_or_path=/local/dir (a directory with config.json, tokenizer files and *.safetensors), "
            "or fetch it once where the hub is reachable (huggingface-cli download "
            f"{self.name}) and share the HF cache (HF_HOME)"
        )

    def load(self, loader, **extra: Any) -> Any:
        """`loader.from_pretrained(source, ...)`, offline when the hub is not to be asked."""
        ctx = contextlib.nullcontext() if self.online or self.local else hub_offline()
        try:
            with ctx:
                return loader.from_pretrained(self.name, **self.kwargs, **extra)
        except (OSError, ValueError) as e:
            if self.online or self.local:
                raise
            raise self.unavailable() from e


def _context_length(config: Any) -> Optional[int]:
    """The model's context: max_position_embeddings of its (text) config, or None when it does not say."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of the model named by `cfg`, without its weights (a run measures its data with it before the
    model loads).

    It always has a pad token (eos when it had none; unk, or a new ``<pad>`` token, when it has no eos either; the
    model's embeddings grow for it in `load_model`). ``tokenizer.ftlab_info`` records what was found and decided:
    ``padding_side`` as loaded, ``pad_token_added``, ``source`` (the directory or hub id), ``prompt_format``
    (model.prompt_format, ``auto`` resolved: ``chat`` when the tokenizer has a chat template, else ``plain``) and
    ``model_context`` (max_position_embeddings of the model's config, None when it has none). Raises
    `HubUnavailable` (< 5 s) when a hub id cannot be fetched, FileNotFoundError / ValueError for an unusable local
    directory, ValueError for model.prompt_format=chat on a tokenizer without a chat template."""
    src = _Source(cfg)
    from transformers import AutoConfig, AutoTokenizer

    try:
        tok = src.load(AutoTokenizer)
    except HubUnavailable:
        raise
    except Exception as e:
        if not src.local:
            raise
        raise ValueError(
            f"model.name_or_path: cannot load a tokenizer from {src.name!r} ({type(e).__name__}: {e}); the "
            "directory needs tokenizer files (tokenizer.json / tokenizer_config.json) from save_pretrained"
        ) from e
    pad_added = False
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
            pad_added = True
    has_template = bool(getattr(tok, "chat_template", None))
    fmt = cfg.prompt_format
    if fmt == "auto":
        fmt = "chat" if has_template else "plain"
    elif fmt == "chat" and not has_template:
        raise ValueError(f"model.prompt_format: chat, but the tokenizer of {src.name!r} has no chat template; use "
                         "model.prompt_format=plain (or auto: chat only when the tokenizer has a template)")
    tok.ftlab_info = {"padding_side": tok.padding_side, "pad_token_added": pad_added, "source": src.name,
                      "prompt_format": fmt, "model_context": _context_length(src.load(AutoConfig))}
    return tok


def load_model(cfg: ModelConfig, tok: Any, device: str = "cpu") -> Any:
    """The causal LM named by `cfg`, in eval mode on `device`, fitted to `tok` (from `load_tokenizer`): embeddings
    grown for a pad token the tokenizer had to add, pad ids set in its configs. ``model.ftlab_source`` is the
    local directory or hub id the weights came from. Only *.safetensors weights load."""
    src = _Source(cfg)
    from transformers import AutoModelForCausalLM

    # use_kernels=False: with the `kernels` package installed (transformers 5.25 requires it), from_pretrained on CUDA
    # swaps layers for Hub kernels by default, fetched online (offline it fails: kernels-community/rotary, seen on an
    # H200) and numerically not the model's own code; ftlab's own kernels are opt-in (hw.kernels)
    kw: dict[str, Any] = dict(dtype=_torch_dtype(cfg.dtype), use_safetensors=True, use_kernels=False)
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    model = src.load(AutoModelForCausalLM, **kw)
    if tok.ftlab_info.get("pad_token_added") and model.get_input_embeddings().num_embeddings < len(tok):
        model.resize_token_embeddings(len(tok))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tok.pad_token_id
    model.ftlab_source = src.name
    model.to(device)
    model.eval()
    return model


def load_model_and_tokenizer(cfg: ModelConfig, device: str = "cpu") -> tuple[Any, Any]:
    """`load_tokenizer` then `load_model`: the causal LM named by `cfg` in eval mode on `device`, and its
    tokenizer."""
    tok = load_tokenizer(cfg)
    return load_model(cfg, tok, device), tok


# ---------------------------------------------------------------------------------------------- fingerprint


def model_fingerprint(model_or_dir: Any) -> str:
    """A stable sha256 hex digest of a model's weights (used to key the base-eval cache).

    - a directory: sha256 over the sorted relative names and contents of its ``*.safetensors`` files
      (pickle weight files if it has none); config and tokenizer files are not part of it;
    - an in-memory model (or a state dict): sha256 over ``name, dtype, shape, raw bytes`` of every tensor in
      ``state_dict()`` order.

    The two forms hash different things and are not comparable with each other; each is stable across
    processes and reloads, and changes when any weight changes.
    """
    if isinstance(model_or_dir, (str, os.PathLike)):
        d = Path(model_or_dir).expanduser()
        if not d.is_dir():
            raise FileNotFoundError(f"model_fingerprint: {str(d)!r} is not a directory")
        files = sorted(p for p in d.rglob("*.safetensors") if p.is_file())
        if not files:
            files = sorted(p for p in d.rglob("*") if p.is_file() and p.name.endswith(_PICKLE_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"model_fingerprint: no weight files (*.safetensors) in {str(d)!r}")
        h = hashlib.sha256(b"ftlab-weights-dir-v1\0")
        for p in files:
            h.update(p.relative_to(d).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\0")
        return h.hexdigest()

    import torch

    state = model_or_dir if isinstance(model_or_dir, dict) else model_or_dir.state_dict()
    h = hashlib.sha256(b"ftlab-weights-tensors-v1\0")
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.device.type == "meta":
            raise ValueError(f"model_fingerprint: tensor {name!r} is on the meta device (weights not loaded)")
        t = t.detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        flat = t.cpu().contiguous().reshape(-1).view(torch.uint8)
        h.update(memoryview(flat.numpy()))
    return h.hexdigest()
