"""Validation of a composed config: typed (each group merged into its schema), resolved, checked across groups
and stages; the result is the RunConfig every worker reads back from config.yaml. Once per process and config."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftlab.config.checks import check_ranges
from ftlab.config.method import METHODS, MethodConfig
from ftlab.config.post import PostConfig, check_post
from ftlab.config.reg import RegConfig
from ftlab.config.registry import ConfigError
from ftlab.config.schema import (
    GENERAL_FORGET,
    TINY_WORLD_LR_SCALE,
    DataConfig,
    EvalConfig,
    HwConfig,
    LoggerConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    to_container,
)
from ftlab.config.stages import check_stages, expand_stages

# What hw.precision loads a model's weights in (model=hf: `dtype: ${ftlab.dtype_of:${hw.precision}}`); the trained
# weights stay float32 masters under bf16/fp16 (ftlab.train.precision).
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype_of(precision: str) -> str:
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"hw.precision: unknown value {precision!r}; valid choices: {', '.join(PRECISION_DTYPES)}")
    return PRECISION_DTYPES[precision]


def _name_of(name_or_path: str) -> str:
    """A model's name from its hub id or directory: the last path component (`/models/my-llama/` -> `my-llama`)."""
    return str(name_or_path).rstrip("/").rpartition("/")[2] or str(name_or_path)


def _general_forget(name_or_path: str) -> list[str]:
    """eval=quick's forgetting suite, by model: the tiny world's (`world`) for model=tiny, else GENERAL_FORGET."""
    return ["world"] if name_or_path == "tiny" else list(GENERAL_FORGET)


def register_resolvers() -> None:
    """The interpolations config YAMLs may use (conf/model/hf.yaml, conf/eval/quick.yaml); resolved at validation,
    so config.yaml holds their values."""
    for name, fn in (("ftlab.dtype_of", _dtype_of), ("ftlab.name_of", _name_of),
                     ("ftlab.general_forget", _general_forget)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def _typed(key: str, schema: type, node: Any) -> Any:
    """Merge a config node into its dataclass schema: unknown keys and wrong types are refused."""
    try:
        if isinstance(node, DictConfig):  # plain data: a node already typed by Hydra may carry `+` additions
            node = OmegaConf.to_container(node, resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        sub = getattr(e, "full_key", None) or ""
        full = f"{key}.{sub}" if sub else key
        msg = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]
        valid = ", ".join(f.name for f in dataclasses.fields(schema))
        raise ConfigError(f"{full}: {msg} (valid keys of {key}: {valid})") from None


# Validated configs of this process, by their composed (unresolved) text: the CLI's check before Hydra starts, the
# run directory's name and the Hydra job itself all validate the same composed config; it is checked once.
_VALIDATED: dict[str, RunConfig] = {}


def validate(cfg: DictConfig | dict) -> RunConfig:
    """Check a composed config; return it as typed dataclasses. Raises ConfigError naming the full key.

    Once per process and config: a config validated before is returned again (a copy), not re-checked."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra", None)
    key = OmegaConf.to_yaml(cfg)
    if key not in _VALIDATED:
        run = _validate(cfg)
        _VALIDATED[key] = run
        # the frozen form too (what config.yaml holds): a worker in this process reads it back without re-checking
        _VALIDATED[OmegaConf.to_yaml(OmegaConf.create(to_container(run)))] = run
    return copy.deepcopy(_VALIDATED[key])


def _validate(cfg: DictConfig) -> RunConfig:
    top_keys = {f.name for f in dataclasses.fields(RunConfig)}
    for k in cfg.keys():
        if k not in top_keys:
            raise ConfigError(f"{k}: unknown top-level key; valid keys: {', '.join(sorted(top_keys))}")
    method_node = cfg.get("method")
    if not isinstance(method_node, DictConfig) or "name" not in method_node:
        raise ConfigError("method: missing; pick one with method=<name>; valid choices: " + ", ".join(METHODS))
    method: MethodConfig = _typed("method", METHODS.config(method_node.name, "method.name"), method_node)
    expand_stages(cfg)
    rest = {k: v for k, v in cfg.items() if k != "method"}
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '') or 'config'}: {getattr(e, 'msg', e)}") from None
    run = RunConfig(
        seed=rest.get("seed", 0),
        out_dir=rest.get("out_dir", "outputs"),
        model=_typed("model", ModelConfig, rest.get("model", {})),
        data=_typed("data", DataConfig, rest.get("data", {})),
        method=method,
        eval=_typed("eval", EvalConfig, rest.get("eval", {})),
        hw=_typed("hw", HwConfig, rest.get("hw", {})),
        logger=_typed("logger", LoggerConfig, rest.get("logger", {})),
        train=_typed("train", TrainConfig, rest.get("train", {})),
        reg=_typed("reg", RegConfig, rest.get("reg", {})),
        post=_typed("post", PostConfig, rest.get("post", {})),
        stages=[_typed(f"stages[{i}]", DataConfig, s) for i, s in enumerate(rest.get("stages") or [])],
    )
    if not isinstance(run.seed, int) or isinstance(run.seed, bool):
        raise ConfigError(f"seed: must be an integer, got {run.seed!r}")
    _resolve_lr(run)
    check_ranges(run)
    check_stages(run)
    check_post(run.post, run)
    return run


def from_container(d: dict) -> RunConfig:
    """Read a run directory's config.yaml back (workers never see Hydra)."""
    return validate(OmegaConf.create(d))


def _resolve_lr(run: RunConfig) -> None:
    """train.lr null: the method's default (times TINY_WORLD_LR_SCALE on the tiny world) (so config.yaml, the run
    name and `ftlab run --cfg job` hold the number the run trains at, before method.lr_scale)."""
    if run.train.lr is None:
        lr = type(run.method).default_lr
        # %.6g: 1e-5 * 30 is 0.00030000000000000003 in floats, and the number names the run
        run.train.lr = float(f"{lr * TINY_WORLD_LR_SCALE:.6g}") if run.model.name_or_path == "tiny" else lr
