"""Config schemas: one dataclass per config group option, validated once, right after Hydra composes.

Pure Python (no torch): `ftlab run` refuses a bad config before any heavy import. YAML files in conf/ name
things (`method: lora`); the registries say which names exist and which schema each one has (methods:
ftlab.config.method.METHODS, each method's schema beside its code in ftlab/methods/; the rest: the lists below).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftlab.config.checks import at_least as _at_least
from ftlab.config.checks import choice as _choice
from ftlab.config.method import METHODS, MethodConfig
from ftlab.config.names import (
    BUILTIN_TASK_KINDS,
    DIAGNOSTICS,
    KIND_METRICS,
    PRETRAIN_SKILLS,
    PROMPT_FORMATS,
    TARGET_SKILLS,
)
from ftlab.config.registry import ConfigError, Registry


# ---------------------------------------------------------------------------------------------------- model
@dataclass
class WorldConfig:
    """The embedded synthetic world: a tiny Llama pretrained by ftlab on procedural skills (model=tiny)."""

    seed: int = 0
    skills: list[str] = field(default_factory=lambda: ["add", "rev", "copy", "sort", "succ", "cnt"])
    # Measured on a 2-core AVX2 CPU (scripts/bench_world.py): d=64 with 8 heads learns every default skill to
    # >= 99 % in 1,500 steps (~60 s); d=128 costs ~2.5x per step. fp32: CPUs without native bf16 emulate it
    # (a bf16-autocast step was ~15x slower there); pick bf16 only where the CPU has it (AVX-512 BF16, AMX).
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 8
    intermediate_size: int = 256
    rope_theta: float = 500.0
    steps: int = 1500
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 50
    precision: str = "fp32"


@dataclass
class ModelConfig:
    name: str = "tiny"
    # "tiny" builds the embedded world's base model; anything else is a HF hub id or a local directory.
    name_or_path: str = "tiny"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    dtype: str = "float32"
    attn_implementation: Optional[str] = "eager"
    max_length: int = 256
    # plain: prompt + response; chat: the tokenizer's chat template wraps the prompt as a user turn.
    prompt_format: str = "plain"
    world: Optional[WorldConfig] = None


# ----------------------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    name: str = "synth_sub"
    source: str = "synth"  # synth | hf | jsonl
    skill: Optional[str] = None  # synth: the target skill
    hf_path: Optional[str] = None
    hf_name: Optional[str] = None
    revision: Optional[str] = None
    path: Optional[str] = None  # a local .jsonl; overrides hf_path (same fields)
    eval_path: Optional[str] = None  # local .jsonl for the target eval; default: `path`'s test rows
    split: str = "train"
    eval_split: str = "test"
    prompt_field: str = "question"
    response_field: str = "answer"
    # how the target eval reads an answer out of a generation: exact | number (GSM8K's `#### N`)
    answer: str = "exact"
    n_train: Optional[int] = None  # None: all rows
    max_new_tokens: int = 16
    # Data mixing / replay (ftlab.data.sources.general_rows): a share `mix` in [0, 1) of the training stream is general
    # data; n task rows get round(n * mix / (1 - mix)) general rows beside them. 0: none.
    mix: float = 0.0
    # null: replay of the tiny world's pretraining skills `mix_skills` (synth data); else a local .jsonl/.json
    # file or a hub dataset id of general text, read from field `mix_field` (hub: config `mix_name`, `mix_split`)
    mix_source: Optional[str] = None
    mix_name: Optional[str] = None
    mix_split: str = "train"
    mix_field: str = "text"
    mix_skills: Optional[list[str]] = None  # synth YAMLs: ${model.world.skills}, the skills the base learnt


# ==================================================================================================== methods
# The "methods" part: the `method` group's schemas live beside each method's code (ftlab/methods/, registered in
# ftlab.config.method.METHODS with their range checks, `MethodConfig.check`); here, the `reg` group's schema and
# its range checks (`_check_reg`, called by `_check_ranges`). A knob that is not a field is refused at compose time.
@dataclass
class RegConfig:
    """A regulariser added to the training loss, composable with any method (config group `reg`)."""

    kind: str = "none"  # none | kl (KL to the frozen base on the batch) | l2sp (L2 pull to the start weights)
    weight: float = 0.0


# kind -> the Regulariser class, registered beside its code in ftlab.train.regularisers (torch-free at import).
REGULARISERS: Registry = Registry("regulariser", "reg.kind", discover="ftlab.train.regularisers")


def _check_reg(reg: RegConfig) -> None:
    REGULARISERS.check(reg.kind)
    if not (isinstance(reg.weight, (int, float)) and reg.weight >= 0):
        raise ConfigError(f"reg.weight: must be >= 0, got {reg.weight!r}")
    if reg.kind != "none" and reg.weight == 0:
        raise ConfigError(f"reg.weight: reg.kind={reg.kind} needs a weight > 0 (e.g. reg.weight=0.1), got 0")


# ================================================================================================ end methods


# ----------------------------------------------------------------------------------------------------- eval
@dataclass
class EvalTaskOptions:
    """Per-task options of a built-in task (eval.tasks.<task>.<option>); null: the default."""

    n: Optional[int] = None  # rows (default: eval.limit)
    few_shot: Optional[int] = None  # examples before each item (default: the task's own)
    format: Optional[str] = None  # plain | chat: the prompt as the user turn of the chat template (default: plain)
    metric: Optional[str] = None  # primary metric (multiple choice: acc | acc_norm)
    subset: Optional[list[str]] = None  # mmlu: subjects, e.g. [abstract_algebra, anatomy]
    fewshot_path: Optional[str] = None  # local .jsonl for the few-shot examples
    split: Optional[str] = None  # hub split of the eval rows
    hf_path: Optional[str] = None  # another hub dataset with the same fields (a mirror)
    hf_name: Optional[str] = None
    revision: Optional[str] = None
    max_new_tokens: Optional[int] = None  # generation
    max_length: Optional[int] = None  # token window for perplexity / multiple choice (default: the model's)


@dataclass
class LmEvalOptions:
    """lm_eval:<task> entries of eval.target / eval.forget (lm-evaluation-harness tasks)."""

    include_path: Optional[str] = None  # a directory of local task YAMLs
    num_fewshot: Optional[int] = None  # null: the task's own
    metric: Optional[str] = None  # null: the task's first mean-aggregated metric


@dataclass
class EvalConfig:
    name: str = "synth"
    # Target tasks; "data" means the training data's own held-out split; or built-in tasks (gsm8k, ...).
    target: list[str] = field(default_factory=lambda: ["data"])
    # Forgetting suite; "world" expands to every pretraining skill of model=tiny plus held-out perplexity;
    # built-in tasks: arc_challenge, arc_easy, hellaswag, winogrande, boolq, mmlu, wikitext, gsm8k.
    forget: list[str] = field(default_factory=lambda: ["world"])
    limit: Optional[int] = 200  # max examples per task
    batch_size: int = 64
    cache_base: bool = True
    # eval.paths.<task>=FILE.jsonl: a built-in task's rows from a local file (the hub dataset's fields).
    paths: dict[str, Optional[str]] = field(default_factory=lambda: {t: None for t in BUILTIN_TASK_KINDS})
    tasks: dict[str, EvalTaskOptions] = field(
        default_factory=lambda: {t: EvalTaskOptions() for t in BUILTIN_TASK_KINDS})
    lm_eval: LmEvalOptions = field(default_factory=LmEvalOptions)
    # In-training probes (ftlab.eval.probes): every probe_every steps (0: off), perplexity and KL to the base on
    # probe_n held-out general texts (model=tiny: the world's pretraining text; else wikitext).
    probe_every: int = 0
    probe_n: int = 32
    probe_max_length: int = 128
    # After training (ftlab.eval.diagnostics.diagnose_run), base vs tuned: any of intruder (intruder dimensions),
    # update (per-matrix update norms and ranks), tuco (tuning contribution on target vs forgetting prompts);
    # summaries in result.json `diagnostics`, tables in the run's diagnostics/. [] = off.
    diagnostics: list[str] = field(default_factory=list)
    diagnostics_n: int = 64  # TuCo prompts per role (target, forget), spread over the role's tasks

    def __post_init__(self) -> None:
        synth = {"data", "world", "synth_ppl"} | {f"synth_{s}" for s in PRETRAIN_SKILLS + TARGET_SKILLS}
        for role in ("target", "forget"):
            for name in getattr(self, role):
                if name not in synth and name not in BUILTIN_TASK_KINDS and not (
                        name.startswith("lm_eval:") and len(name) > len("lm_eval:")):
                    raise ConfigError(f"eval.{role}: unknown task {name!r}; valid: data, world, synth_ppl, "
                                      f"synth_<skill>, {', '.join(BUILTIN_TASK_KINDS)}, lm_eval:<task>")
        for key in ("paths", "tasks"):
            for name in getattr(self, key):
                if name not in BUILTIN_TASK_KINDS:
                    raise ConfigError(f"eval.{key}.{name}: unknown built-in task; valid: "
                                      f"{', '.join(BUILTIN_TASK_KINDS)}")
        _at_least("eval.lm_eval.num_fewshot", self.lm_eval.num_fewshot, 0, allow_none=True)
        if self.lm_eval.include_path is not None and not os.path.isdir(os.path.expanduser(self.lm_eval.include_path)):
            raise ConfigError(f"eval.lm_eval.include_path: directory {self.lm_eval.include_path!r} does not exist")
        _at_least("eval.probe_every", self.probe_every, 0)
        _at_least("eval.probe_n", self.probe_n, 1)
        _at_least("eval.probe_max_length", self.probe_max_length, 2)
        for d in self.diagnostics:
            _choice("eval.diagnostics", d, DIAGNOSTICS)
        _at_least("eval.diagnostics_n", self.diagnostics_n, 1)
        for name, p in self.paths.items():
            if p is not None and not os.path.isfile(os.path.expanduser(p)):
                raise ConfigError(f"eval.paths.{name}: file {p!r} does not exist; give a .jsonl with the hub "
                                  "dataset's fields")
        for name, o in self.tasks.items():
            k = f"eval.tasks.{name}"
            _at_least(f"{k}.n", o.n, 1, allow_none=True)
            _at_least(f"{k}.few_shot", o.few_shot, 0, allow_none=True)
            _at_least(f"{k}.max_new_tokens", o.max_new_tokens, 1, allow_none=True)
            _at_least(f"{k}.max_length", o.max_length, 2, allow_none=True)
            if o.format is not None:
                _choice(f"{k}.format", o.format, PROMPT_FORMATS)
            if o.metric is not None:
                _choice(f"{k}.metric", o.metric, KIND_METRICS[BUILTIN_TASK_KINDS[name]])
            if o.subset is not None and name != "mmlu":
                raise ConfigError(f"{k}.subset: only mmlu has subsets, got {o.subset!r}")
            if o.fewshot_path is not None and not os.path.isfile(os.path.expanduser(o.fewshot_path)):
                raise ConfigError(f"{k}.fewshot_path: file {o.fewshot_path!r} does not exist")


# ------------------------------------------------------------------------------------------------------- hw
@dataclass
class SlurmConfig:
    """hw.slurm: run each job on a SLURM cluster (Hydra's submitit launcher, one array per sweep) instead of here.
    Every job of a sweep shares these (one sbatch array). ftlab.launch.slurm_job maps them to hydra.launcher.*."""

    partition: Optional[str] = None  # None: the cluster's default partition
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    # nodes: hw.nnodes; processes per node: hw.nproc (torchrun inside the job when their product is > 1)
    gpus_per_node: int = 0
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None
    time_min: int = 60  # the job's time limit
    # SLURM sends the stop signal (USR2) this long before the time limit: the job finishes its step, writes a
    # training-state checkpoint, requeues itself and exits. Preemption sends it too (preempt_send_user_signal).
    signal_lead_s: int = 120
    max_requeues: int = 3  # self-requeues on the signal, counted by SLURM_RESTART_COUNT; then the run fails
    save_on_signal: bool = True  # False: stop at once on the signal, resume from the last train.save_every save
    array_parallelism: int = 256  # jobs of the sweep running at once
    setup: list[str] = field(default_factory=list)  # shell lines before the job starts (module load, ...)
    additional: dict[str, Any] = field(default_factory=dict)  # more sbatch flags, e.g. {exclusive: true}


@dataclass
class HwConfig:
    name: str = "cpu"
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16
    nproc: int = 1  # processes per node; > 1: `ftlab run` starts torchrun (ftlab.train.distributed)
    nnodes: int = 1  # nodes (torchrun c10d rendezvous at MASTER_ADDR:MASTER_PORT when > 1)
    strategy: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per decoder block); used when nproc * nnodes > 1
    micro_batch_size: Optional[int] = None  # rows per forward on a process; None: its whole share of the batch
    num_threads: Optional[int] = None  # torch intra-op threads; None: torch's default
    grad_checkpointing: bool = False
    slurm: Optional[SlurmConfig] = None  # set (hw=slurm_cpu, hw=slurm_gpu): jobs go to SLURM


# --------------------------------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig:
    name: str = "console"  # console | wandb
    project: str = "ftlab"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    tags: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    max_steps: int = 200
    lr: float = 1e-3
    batch_size: int = 32
    grad_accum: int = 1
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    save_every: int = 0  # steps between training-state checkpoints (resume); 0: none, only the final export
    keep_checkpoints: int = 2  # the newest k training-state checkpoints are kept
    log_every: int = 10


@dataclass
class RunConfig:
    seed: int = 0
    out_dir: str = "outputs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: Any = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    hw: HwConfig = field(default_factory=HwConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    # Continual protocol: the data of each training stage, in order (`data=[a,b]` on the command line, or
    # stages=[a,b]: data option names, expanded at compose time to full data configs; `data` is stage 0).
    # Empty: one stage, `data`.
    stages: list[Any] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ registries
DATA_SOURCES = ("synth", "hf", "jsonl")
ANSWER_KINDS = ("exact", "number")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("cosine", "linear", "constant")
LOGGERS = ("console", "wandb")
LOGGER_MODES = ("offline", "online", "disabled")
DTYPES = ("float32", "bfloat16", "float16", "auto")


# ------------------------------------------------------------------------------------------------ validation
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
    _expand_stages(cfg)
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
        stages=[_typed(f"stages[{i}]", DataConfig, s) for i, s in enumerate(rest.get("stages") or [])],
    )
    if not isinstance(run.seed, int) or isinstance(run.seed, bool):
        raise ConfigError(f"seed: must be an integer, got {run.seed!r}")
    _check_ranges(run)
    _check_stages(run)
    return run


# ------------------------------------------------------------------------------------------ continual stages
def data_options() -> list[str]:
    """The `data` group's options (conf/data/*.yaml)."""
    from pathlib import Path

    from ftlab.config.conf import conf_dir

    return sorted(p.stem for p in (Path(conf_dir()) / "data").glob("*.yaml"))


def _expand_stages(cfg: DictConfig) -> None:
    """`stages` given as data option names become full data configs, in place: option i's YAML over the schema
    defaults plus the user's `data.*` overrides (the keys where the composed `data` differs from its own
    option), so `data=[a,b] data.n_train=256` trains 256 rows in every stage, as `data=a` and `data=b` would.
    `data` becomes stage 0. Stages that are already data configs (a run directory's config.yaml) stay."""
    from pathlib import Path

    from ftlab.config.conf import conf_dir

    stages = cfg.get("stages")
    if not stages or all(isinstance(s, (dict, DictConfig)) for s in stages):
        return
    if not all(isinstance(s, str) for s in stages):
        raise ConfigError(f"stages: give data option names, e.g. stages=[synth_sub,synth_rot1] (or "
                          f"data=[synth_sub,synth_rot1]), got {OmegaConf.to_container(stages)}")
    valid = data_options()
    for i, name in enumerate(stages):
        _choice(f"stages[{i}]", name, valid)
    root = Path(conf_dir()) / "data"

    def option(name: str) -> DictConfig:
        return OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(root / f"{name}.yaml"))

    data = cfg.get("data")
    composed = OmegaConf.to_container(data, resolve=False) if data is not None else {}
    own = OmegaConf.to_container(option(composed["name"]), resolve=False) if composed.get("name") in valid else {}
    overrides = {k: v for k, v in composed.items() if k not in own or own[k] != v}
    expanded = [data if data is not None and name == composed.get("name") else OmegaConf.merge(option(name), overrides)
                for name in stages]
    cfg.stages = expanded
    cfg.data = expanded[0]


def _check_stages(c: RunConfig) -> None:
    """A continual run: at least two distinct stages, `data` is stage 0, every stage passes the data checks, the
    eval scores every stage's target; one process (stage evaluations run between stages on rank 0 only)."""
    if not c.stages:
        return
    names = [s.name for s in c.stages]
    if len(names) < 2:
        raise ConfigError(f"stages: a continual run needs at least two stages, got {names}; for one, use data={names[0]}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"stages: {dup} appear more than once in {names}; each stage's target is scored under its "
                          "data name, so stage names must differ")
    if c.data != c.stages[0]:
        raise ConfigError(f"data: a continual run's data is its first stage ({names[0]}), got data.name={c.data.name}; "
                          f"set the stages with data=[{','.join(names)}]")
    if "data" not in c.eval.target:
        raise ConfigError(f"eval.target: a continual run scores every stage's held-out split after each stage; "
                          f"include data, e.g. eval.target=[data], got {c.eval.target}")
    if c.hw.nproc * c.hw.nnodes > 1:
        raise ConfigError(f"stages: continual runs use one process for now (stage evaluations run between "
                          f"stages); got hw.nproc={c.hw.nproc} x hw.nnodes={c.hw.nnodes}")
    for i, stage in enumerate(c.stages[1:], 1):
        try:
            _check_ranges(dataclasses.replace(c, data=stage, stages=[]))
        except ConfigError as e:
            raise ConfigError(f"stages[{i}] ({stage.name}): {e}") from None


def _check_ranges(c: RunConfig) -> None:
    t = c.train
    _at_least("train.max_steps", t.max_steps, 1)
    if not t.lr > 0:
        raise ConfigError(f"train.lr: must be > 0, got {t.lr!r}")
    _at_least("train.batch_size", t.batch_size, 1)
    _at_least("train.grad_accum", t.grad_accum, 1)
    _at_least("train.warmup_steps", t.warmup_steps, 0)
    _at_least("train.weight_decay", t.weight_decay, 0)
    _at_least("train.max_grad_norm", t.max_grad_norm, 0)
    _at_least("train.save_every", t.save_every, 0)
    _at_least("train.keep_checkpoints", t.keep_checkpoints, 1)
    _at_least("train.log_every", t.log_every, 1)
    for k in ("adam_beta1", "adam_beta2"):
        v = getattr(t, k)
        if not 0 <= v < 1:
            raise ConfigError(f"train.{k}: must be in [0, 1), got {v!r}")
    _choice("train.schedule", t.schedule, SCHEDULES)

    m = c.model
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("model.prompt_format", m.prompt_format, PROMPT_FORMATS)
    _at_least("model.max_length", m.max_length, 8)
    if m.name_or_path == "tiny":
        if m.world is None:
            raise ConfigError("model.world: model.name_or_path=tiny needs a world section (use model=tiny)")
        w = m.world
        for s in w.skills:
            _choice("model.world.skills", s, PRETRAIN_SKILLS)
        if len(set(w.skills)) != len(w.skills) or not w.skills:
            raise ConfigError(f"model.world.skills: must be a non-empty list without repeats, got {w.skills}")
        for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "steps", "batch_size"):
            _at_least(f"model.world.{k}", getattr(w, k), 1)
        if w.hidden_size % w.num_heads:
            raise ConfigError(
                f"model.world.hidden_size: {w.hidden_size} is not divisible by model.world.num_heads={w.num_heads}"
            )
        _choice("model.world.precision", w.precision, PRECISIONS)
    elif _looks_like_path(m.name_or_path) and not os.path.isdir(os.path.expanduser(m.name_or_path)):
        raise ConfigError(
            f"model.name_or_path: local directory {m.name_or_path!r} does not exist; "
            "give an existing directory with config.json, or a hub id like 'Qwen/Qwen2.5-0.5B'"
        )

    d = c.data
    _choice("data.source", d.source, DATA_SOURCES)
    _choice("data.answer", d.answer, ANSWER_KINDS)
    _at_least("data.n_train", d.n_train, 1, allow_none=True)
    _at_least("data.max_new_tokens", d.max_new_tokens, 1)
    if d.source == "synth":
        if d.skill is None:
            raise ConfigError("data.skill: synth data needs a skill; valid: " + ", ".join(TARGET_SKILLS + PRETRAIN_SKILLS))
        _choice("data.skill", d.skill, TARGET_SKILLS + PRETRAIN_SKILLS)
        if m.name_or_path != "tiny":
            raise ConfigError(
                f"data.source: synth data ({d.name}) is written in the tiny world's alphabet and needs model=tiny, "
                f"got model.name_or_path={m.name_or_path!r}; pick real data (e.g. data=gsm8k) for real models"
            )
    if d.source == "jsonl" and not d.path:
        raise ConfigError("data.path: data.source=jsonl needs data.path=FILE.jsonl")
    _check_mix(d, m)
    if d.source == "hf" and not (d.hf_path or d.path):
        raise ConfigError("data.hf_path: data.source=hf needs data.hf_path (a hub dataset id) or data.path=FILE.jsonl")
    for key in ("path", "eval_path"):
        p = getattr(d, key)
        if p is not None and not os.path.isfile(os.path.expanduser(p)):
            raise ConfigError(f"data.{key}: file {p!r} does not exist; give a .jsonl with fields "
                              f"'{d.prompt_field}' and '{d.response_field}'")

    e = c.eval
    _at_least("eval.limit", e.limit, 1, allow_none=True)
    _at_least("eval.batch_size", e.batch_size, 1)
    for task in e.forget:
        if task == "world" and m.name_or_path != "tiny":
            raise ConfigError("eval.forget: 'world' is the tiny world's forgetting suite and needs model=tiny; "
                              "pick another eval suite for real models")

    h = c.hw
    _choice("hw.device", h.device, DEVICES)
    _choice("hw.precision", h.precision, PRECISIONS)
    _at_least("hw.nproc", h.nproc, 1)
    _at_least("hw.nnodes", h.nnodes, 1)
    _choice("hw.strategy", h.strategy, ("ddp", "fsdp"))
    _at_least("hw.micro_batch_size", h.micro_batch_size, 1, allow_none=True)
    procs = h.nproc * h.nnodes
    if procs > 1 and c.train.batch_size % procs:
        raise ConfigError(f"train.batch_size: {c.train.batch_size} does not split over {procs} processes "
                          f"(hw.nproc={h.nproc} x hw.nnodes={h.nnodes}); use a multiple of {procs}")
    if procs > 1 and not c.method.fixed_trainable_set:
        raise ConfigError(f"method={c.method.name}: changes its trainable parameters during training, which "
                          f"DDP/FSDP cannot follow yet; run it with hw.nproc=1 (hw=cpu or hw=gpu)")
    _at_least("hw.num_threads", h.num_threads, 1, allow_none=True)
    if h.slurm is not None:
        _check_slurm(c)

    lg = c.logger
    _choice("logger.name", lg.name, LOGGERS)
    _choice("logger.mode", lg.mode, LOGGER_MODES)

    c.method.check()
    _check_reg(c.reg)


# The stop signal must leave time to finish the step in flight and write a training-state checkpoint (seconds for
# the tiny world, tens of seconds for a billion parameters on a network file system); slurmctld also checks
# signal times only on a ~30 s tick.
MIN_SIGNAL_LEAD_S = 30
# sbatch(1): "the signal may be sent up to 60 seconds earlier than specified".
SIGNAL_EARLY_S = 60


def _check_slurm(c: RunConfig) -> None:
    s, h = c.hw.slurm, c.hw
    _at_least("hw.slurm.gpus_per_node", s.gpus_per_node, 0)
    _at_least("hw.slurm.cpus_per_task", s.cpus_per_task, 1, allow_none=True)
    _at_least("hw.slurm.mem_gb", s.mem_gb, 1, allow_none=True)
    _at_least("hw.slurm.time_min", s.time_min, 1)
    _at_least("hw.slurm.max_requeues", s.max_requeues, 0)
    _at_least("hw.slurm.array_parallelism", s.array_parallelism, 1)
    limit = s.time_min * 60
    if s.signal_lead_s >= limit:
        raise ConfigError(f"hw.slurm.signal_lead_s: {s.signal_lead_s} s is not shorter than the time limit "
                          f"hw.slurm.time_min={s.time_min} ({limit} s): the job would be told to stop before it "
                          "trains; raise hw.slurm.time_min or lower hw.slurm.signal_lead_s")
    if s.signal_lead_s < MIN_SIGNAL_LEAD_S:
        raise ConfigError(f"hw.slurm.signal_lead_s: {s.signal_lead_s} s leaves no time to finish the current step "
                          f"and write a checkpoint before the time limit; use at least {MIN_SIGNAL_LEAD_S}")
    if s.signal_lead_s + SIGNAL_EARLY_S > limit / 2:
        raise ConfigError(
            f"hw.slurm.signal_lead_s: {s.signal_lead_s} s with hw.slurm.time_min={s.time_min} leaves too little time "
            f"to train: SLURM may signal up to {SIGNAL_EARLY_S} s early, so an allocation could train only "
            f"{max(limit - s.signal_lead_s - SIGNAL_EARLY_S, 0)} s of its {limit} s before it checkpoints and "
            f"requeues; keep signal_lead_s + {SIGNAL_EARLY_S} <= half the time limit (raise hw.slurm.time_min "
            "or lower hw.slurm.signal_lead_s)")
    if not s.save_on_signal and c.train.save_every == 0:
        raise ConfigError("train.save_every: 0 with hw.slurm.save_on_signal=false: a preempted or timed-out job "
                          "would restart from step 0; set train.save_every=N or hw.slurm.save_on_signal=true")
    if h.device == "cuda" and s.gpus_per_node < h.nproc:
        raise ConfigError(f"hw.slurm.gpus_per_node: {s.gpus_per_node} GPU(s) per node for hw.nproc={h.nproc} "
                          f"processes per node; set hw.slurm.gpus_per_node={h.nproc}")


def _check_mix(d: DataConfig, m: ModelConfig) -> None:
    if not (isinstance(d.mix, (int, float)) and 0 <= d.mix < 1):
        raise ConfigError(f"data.mix: must be in [0, 1) (the share of general rows in the training stream), got {d.mix!r}")
    if d.mix == 0:
        return
    if d.mix_source is not None:
        src = os.path.expanduser(d.mix_source)
        if (_looks_like_path(d.mix_source) or d.mix_source.endswith((".jsonl", ".json"))) and not (
                os.path.isfile(src) or os.path.isdir(src)):
            raise ConfigError(f"data.mix_source: file {d.mix_source!r} does not exist; give a .jsonl of general "
                              f"text (field data.mix_field={d.mix_field!r}) or a hub dataset id")
        return
    if d.source != "synth":
        raise ConfigError("data.mix_source: data.mix > 0 needs a source of general text for non-synthetic data: "
                          "data.mix_source=FILE.jsonl (one object per line, text in field data.mix_field) or a hub "
                          "dataset id (e.g. data.mix_source=Salesforce/wikitext data.mix_name=wikitext-103-raw-v1)")
    if not d.mix_skills:
        raise ConfigError("data.mix_skills: replay needs at least one pretraining skill, e.g. data.mix_skills=[add,rev]")
    learnt = m.world.skills if m.world is not None else PRETRAIN_SKILLS
    for s in d.mix_skills:
        if s not in learnt:
            raise ConfigError(f"data.mix_skills: {s!r} is not a pretraining skill of this world (model.world.skills="
                              f"[{', '.join(learnt)}]); replay only what the base learnt")


def _looks_like_path(s: str) -> bool:
    # "org/name" is a hub id; "./x", "/x", "~/x" and "a/b/c" are paths.
    return s.startswith((".", "/", "~")) or s.count("/") >= 2


def to_container(run: RunConfig) -> dict:
    """The resolved config as plain data (what config.yaml in a run directory holds)."""
    return dataclasses.asdict(run)


def from_container(d: dict) -> RunConfig:
    """Read a run directory's config.yaml back (workers never see Hydra)."""
    return validate(OmegaConf.create(d))
