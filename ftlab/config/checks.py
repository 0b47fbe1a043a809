"""Range checks of a whole typed config across groups (`check_ranges`), built on ftlab.config.bounds. Each refusal
names the full key, the bound or the valid choices (with the closest one), the value given and, where there is
one, the fix."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ftlab.config.bounds import at_least, choice
from ftlab.config.names import PRETRAIN_SKILLS, PROMPT_FORMATS, TARGET_SKILLS, VALIDATION_SPLITS
from ftlab.config.reg import check_reg
from ftlab.config.registry import ConfigError

if TYPE_CHECKING:
    from ftlab.config.schema import DataConfig, ModelConfig, RunConfig

# The choices of plain config keys (the ones a registry does not own).
DATA_SOURCES = ("synth", "hf", "jsonl")
ANSWER_KINDS = ("exact", "number")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("cosine", "linear", "constant")
LOGGERS = ("console", "wandb")
LOGGER_MODES = ("offline", "online", "disabled")
DTYPES = ("float32", "bfloat16", "float16", "auto")




def check_ranges(c: RunConfig) -> None:
    """Ranges and cross-group rules of a typed config (types and unknown keys are the schemas' job)."""
    t = c.train
    at_least("train.max_steps", t.max_steps, 1)
    if not t.lr > 0:
        raise ConfigError(f"train.lr: must be > 0, got {t.lr!r}")
    at_least("train.batch_size", t.batch_size, 1)
    at_least("train.grad_accum", t.grad_accum, 1)
    at_least("train.warmup_steps", t.warmup_steps, 0)
    at_least("train.weight_decay", t.weight_decay, 0)
    at_least("train.max_grad_norm", t.max_grad_norm, 0)
    at_least("train.save_every", t.save_every, 0)
    at_least("train.keep_checkpoints", t.keep_checkpoints, 1)
    at_least("train.log_every", t.log_every, 1)
    for k in ("adam_beta1", "adam_beta2"):
        v = getattr(t, k)
        if not 0 <= v < 1:
            raise ConfigError(f"train.{k}: must be in [0, 1), got {v!r}")
    choice("train.schedule", t.schedule, SCHEDULES)

    m = c.model
    choice("model.dtype", m.dtype, DTYPES)
    choice("model.prompt_format", m.prompt_format, ("auto", *PROMPT_FORMATS))
    at_least("model.max_length", m.max_length, 8, allow_none=True)
    if not m.name_or_path.strip():
        raise ConfigError("model.name_or_path: empty; model=hf needs a model: model.name_or_path=DIR (a local "
                          "directory written by save_pretrained) or a hub id such as model.name_or_path=Qwen/Qwen2.5-0.5B")
    if m.name_or_path == "tiny":
        if m.world is None:
            raise ConfigError("model.world: model.name_or_path=tiny needs a world section (use model=tiny)")
        w = m.world
        for s in w.skills:
            choice("model.world.skills", s, PRETRAIN_SKILLS)
        if len(set(w.skills)) != len(w.skills) or not w.skills:
            raise ConfigError(f"model.world.skills: must be a non-empty list without repeats, got {w.skills}")
        for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "steps", "batch_size"):
            at_least(f"model.world.{k}", getattr(w, k), 1)
        if w.hidden_size % w.num_heads:
            raise ConfigError(
                f"model.world.hidden_size: {w.hidden_size} is not divisible by model.world.num_heads={w.num_heads}"
            )
        choice("model.world.precision", w.precision, PRECISIONS)
    elif looks_like_path(m.name_or_path) and not os.path.isdir(os.path.expanduser(m.name_or_path)):
        raise ConfigError(
            f"model.name_or_path: local directory {m.name_or_path!r} does not exist; "
            "give an existing directory with config.json, or a hub id like 'Qwen/Qwen2.5-0.5B'"
        )

    d = c.data
    choice("data.source", d.source, DATA_SOURCES)
    choice("data.answer", d.answer, ANSWER_KINDS)
    at_least("data.n_train", d.n_train, 1, allow_none=True)
    at_least("data.max_new_tokens", d.max_new_tokens, 1)
    if d.source == "synth":
        if d.skill is None:
            raise ConfigError("data.skill: synth data needs a skill; valid: " + ", ".join(TARGET_SKILLS + PRETRAIN_SKILLS))
        choice("data.skill", d.skill, TARGET_SKILLS + PRETRAIN_SKILLS)
        if m.name_or_path != "tiny":
            raise ConfigError(
                f"data.source: synth data ({d.name}) is written in the tiny world's alphabet and needs model=tiny, "
                f"got model.name_or_path={m.name_or_path!r}; pick real data (e.g. data=gsm8k) for real models"
            )
    if d.source == "jsonl" and not d.path:
        raise ConfigError("data.path: data.source=jsonl needs data.path=FILE.jsonl")
    check_mix(d, m)
    check_name(d.name)
    if d.source == "hf" and not (d.hf_path or d.path):
        raise ConfigError("data.hf_path: data.source=hf needs data.hf_path (a hub dataset id) or data.path=FILE.jsonl")
    for key in ("path", "eval_path", "validation_path"):
        p = getattr(d, key)
        if p is not None and not os.path.isfile(os.path.expanduser(p)):
            raise ConfigError(f"data.{key}: file {p!r} does not exist; give a .jsonl with fields "
                              f"'{d.prompt_field}' and '{d.response_field}'")
    check_eval_file(d)

    e = c.eval
    at_least("eval.limit", e.limit, 1, allow_none=True)
    at_least("eval.batch_size", e.batch_size, 1)
    check_validation(c)
    if e.curve_every and c.hw.strategy == "fsdp" and c.hw.nproc * c.hw.nnodes > 1:
        raise ConfigError("eval.curve_every: the curve scores the model on rank 0 during training, which FSDP's sharded "
                          "weights cannot do; set eval.curve_every=0 or hw.strategy=ddp")
    for task in e.forget:
        if task == "world" and m.name_or_path != "tiny":
            raise ConfigError("eval.forget: 'world' is the tiny world's forgetting suite and needs model=tiny; "
                              "for real models pick eval=quick (a small built-in forgetting suite there: "
                              "arc_easy, wikitext), eval=target, eval=standard or eval=biderman")

    h = c.hw
    choice("hw.device", h.device, DEVICES)
    choice("hw.precision", h.precision, PRECISIONS)
    at_least("hw.nproc", h.nproc, 1)
    at_least("hw.nnodes", h.nnodes, 1)
    choice("hw.strategy", h.strategy, ("ddp", "fsdp"))
    at_least("hw.micro_batch_size", h.micro_batch_size, 1, allow_none=True)
    procs = h.nproc * h.nnodes
    if procs > 1 and c.train.batch_size % procs:
        raise ConfigError(f"train.batch_size: {c.train.batch_size} does not split over {procs} processes "
                          f"(hw.nproc={h.nproc} x hw.nnodes={h.nnodes}); use a multiple of {procs}")
    if procs > 1 and not c.method.fixed_trainable_set:
        raise ConfigError(f"method={c.method.name}: changes its trainable parameters during training, which "
                          f"DDP/FSDP cannot follow yet; run it with hw.nproc=1 (hw=cpu or hw=gpu)")
    at_least("hw.num_threads", h.num_threads, 1, allow_none=True)
    if c.data.packing and c.method.name == "prompt_tuning":  # its virtual tokens would lead the first row only
        raise ConfigError("data.packing: method=prompt_tuning prepends its virtual tokens to each sequence, and a "
                          "packed sequence holds several rows; set data.packing=false")
    if c.data.packing and c.reg.kind == "kl":  # its reference forward reads the batch unpacked
        raise ConfigError("data.packing: reg.kind=kl runs the reference model on the training batch as padded rows; "
                          "set data.packing=false or another reg.kind")
    if h.kernels:
        import importlib.util  # find_spec only: validation stays free of triton and torch

        if importlib.util.find_spec("triton") is None:
            raise ConfigError("hw.kernels: needs triton, which is not installed here; pip install 'ftlab[kernels]' "
                              "or set hw.kernels=false")
    if h.slurm is not None:
        check_slurm(c)

    lg = c.logger
    choice("logger.name", lg.name, LOGGERS)
    choice("logger.mode", lg.mode, LOGGER_MODES)

    c.method.check()
    run_check = getattr(c.method, "check_run", None)  # a method's rules across groups (CorDA: its calibration rows)
    if run_check is not None:
        run_check(c)
    check_reg(c.reg, c)


# The stop signal must leave time to finish the step in flight and write a training-state checkpoint (seconds for
# the tiny world, tens of seconds for a billion parameters on a network file system); slurmctld also checks
# signal times only on a ~30 s tick.
MIN_SIGNAL_LEAD_S = 30
# sbatch(1): "the signal may be sent up to 60 seconds earlier than specified".
SIGNAL_EARLY_S = 60


def check_slurm(c: RunConfig) -> None:
    s, h = c.hw.slurm, c.hw
    at_least("hw.slurm.gpus_per_node", s.gpus_per_node, 0)
    at_least("hw.slurm.cpus_per_task", s.cpus_per_task, 1, allow_none=True)
    at_least("hw.slurm.mem_gb", s.mem_gb, 1, allow_none=True)
    at_least("hw.slurm.time_min", s.time_min, 1)
    at_least("hw.slurm.max_requeues", s.max_requeues, 0)
    at_least("hw.slurm.array_parallelism", s.array_parallelism, 1)
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


def check_eval_file(d: DataConfig) -> None:
    """data.eval_path that is data.path itself (the same file, or a copy of it) would score the training rows:
    refused unless data.allow_overlap (partial overlap is measured after the data loads: ftlab.eval.overlap)."""
    if not (d.path and d.eval_path) or d.allow_overlap:
        return
    from ftlab.utils.files import sha256_file

    a, b = os.path.expanduser(d.path), os.path.expanduser(d.eval_path)
    if os.path.samefile(a, b) or sha256_file(a) == sha256_file(b):
        what = "the same file as" if os.path.samefile(a, b) else "a byte-identical copy of"
        raise ConfigError(f"data.eval_path: {d.eval_path!r} is {what} data.path ({d.path!r}): the evaluation would "
                          "score the training rows (memorisation, not learning); give held-out rows, or drop "
                          "data.eval_path (a held-out slice of data.path is scored), or set data.allow_overlap=true "
                          "to run it anyway")


# data.mix above this would add more than 9 general rows per task row (0.9999999: ~1e7 per row, ~4e10 rows for the
# synth default): the task is lost in replay, and the stream may not fit in memory
MIX_MAX = 0.9


# data.name becomes file names (records/<task>.jsonl, the run directory's name) under the file system's 255 bytes
NAME_MAX = 100


def check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"data.name: must be a non-empty name, got {name!r}")
    if len(name.encode("utf-8")) > NAME_MAX or "/" in name or "\\" in name or "\x00" in name:
        raise ConfigError(f"data.name: {name[:40]!r}... ({len(name)} characters) names files in the run directory; "
                          f"use at most {NAME_MAX} bytes without '/', '\\' or NUL")


def check_mix(d: DataConfig, m: ModelConfig) -> None:
    r = d.replay_previous
    if not (isinstance(r, (int, float)) and 0 <= r <= MIX_MAX):
        raise ConfigError(f"data.replay_previous: must be in [0, {MIX_MAX}] (the share of earlier stages' rows beside "
                          f"a continual stage's task rows; {MIX_MAX}: 9 per task row), got {r!r}")
    if not (isinstance(d.mix, (int, float)) and 0 <= d.mix < 1):
        raise ConfigError(f"data.mix: must be in [0, 1) (the share of general rows in the training stream), got {d.mix!r}")
    if d.mix > MIX_MAX:
        raise ConfigError(f"data.mix: {d.mix!r} would add {d.mix / (1 - d.mix):.3g} general rows per task row "
                          f"(n task rows get n * mix / (1 - mix) general rows beside them); use at most {MIX_MAX} "
                          "(9 general rows per task row)")
    if d.mix == 0:
        return
    if d.mix_source is not None:
        src = os.path.expanduser(d.mix_source)
        if (looks_like_path(d.mix_source) or d.mix_source.endswith((".jsonl", ".json"))) and not (
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


def looks_like_path(s: str) -> bool:
    # "org/name" is a hub id; "./x", "/x", "~/x" and "a/b/c" are paths.
    return s.startswith((".", "/", "~")) or s.count("/") >= 2


def check_validation(c: "RunConfig") -> None:
    """eval.validation=true needs a validation split, disjoint from train and test, for every target and forgetting
    task: the world and synth data have one; a data file needs data.validation_path; a built-in task needs a hub
    validation split that is not its evaluation split (`VALIDATION_SPLITS`)."""
    e = c.eval
    if not e.validation:
        return
    for i, d in enumerate(c.stages or [c.data]):
        key = "data" if not c.stages else f"stages.{i}"
        if d.source != "synth" and not d.validation_path:
            raise ConfigError(f"eval.validation: {key} ({d.name}) has no validation split; give {key}.validation_path="
                              "FILE.jsonl (rows disjoint from the training and test rows), or set eval.validation=false")
    for name in list(e.target) + list(e.forget):
        if name in ("data", "world", "synth_ppl") or name.startswith("synth_"):
            continue
        why = None
        if name.startswith("lm_eval:"):
            why = "lm-eval tasks are scored on the split their YAML names"
        elif name not in VALIDATION_SPLITS:
            why = "its evaluation split is the dataset's only labelled held-out split"
        elif (e.paths or {}).get(name):
            why = f"its rows come from a local file (eval.paths.{name})"
        if why:
            raise ConfigError(f"eval.validation: task {name!r} has no validation split ({why}); drop it from eval.target/"
                              "eval.forget for a selection sweep, or set eval.validation=false")
