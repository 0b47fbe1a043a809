"""The world's model: its config as a plain dict (defaults filled, checked) and the tiny Llama built from it."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from ftlab.world import skills as sk
from ftlab.world.tokenizer import build_tokenizer

# Eager attention: on CPU, SDPA's backward made d=128 pretraining steps 2-3x slower (synthetic-world.md);
# at d=64 the two are on par (76 vs 79 ms per step, 1 thread).
ATTN_IMPL = "eager"


def world_config(world: Any) -> dict:
    """The world config as a plain dict with every `WorldConfig` field (defaults filled in, types normalised).

    Accepts a dict, an OmegaConf node or a `WorldConfig`. Unknown keys are refused; keys left out (or null) take
    the values of the config's `size` (ftlab.config.schema.WORLD_SIZES), then `WorldConfig`'s defaults.
    """
    from ftlab.config.schema import WorldConfig

    if dataclasses.is_dataclass(world):
        world = dataclasses.asdict(world)
    elif not isinstance(world, Mapping):
        from omegaconf import OmegaConf

        world = OmegaConf.to_container(world, resolve=True)
    valid = [f.name for f in dataclasses.fields(WorldConfig)]
    unknown = sorted(set(world) - set(valid))
    if unknown:
        raise ValueError(f"world config: unknown keys {unknown}; valid keys: {', '.join(valid)}")
    cfg = dataclasses.asdict(WorldConfig(**dict(world)))  # fields left out or null: the size's preset (WORLD_SIZES)
    cfg["skills"] = list(cfg["skills"])
    for k in ("seed", "hidden_size", "num_layers", "num_heads", "intermediate_size", "steps", "batch_size",
              "warmup_steps"):
        cfg[k] = int(cfg[k])
    for k in ("rope_theta", "lr", "init_std"):
        cfg[k] = float(cfg[k])
    bad = [s for s in cfg["skills"] if s not in sk.PRETRAIN_SKILLS]
    if bad or not cfg["skills"]:
        raise ValueError(f"world.skills: {cfg['skills']} must be a non-empty subset of {sk.PRETRAIN_SKILLS}")
    if cfg["precision"] not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"world.precision: {cfg['precision']!r}; valid: fp32, bf16, fp16")
    return cfg


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
        initializer_range=cfg["init_std"],
    )
    torch.manual_seed(cfg["seed"])
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model
