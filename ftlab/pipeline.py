# Over 400 lines on purpose: one run's named steps, the _Run they fill in and the failure handling around them read in
# order, top to bottom; what each step calls lives in train/, eval/, post/ and rundir/.
"""One run, from its run directory: the steps every process (in-process, torchrun rank, SLURM job) takes. Reads
the frozen config.yaml there and never imports Hydra.

    _load -> _evaluate_base (cached) -> _prepare (method, regulariser, probes, wrap) -> _train (the one loop, or
    one per continual stage) -> _evaluate_tuned_and_record (export, tuned eval, diagnostics, gain/forgetting)
    -> _post (post=interp|lines: variants of the exported weights, ftlab.post; a completed run given another
    `post` runs this step alone)

result.json (status, summary, tasks, train, env), per-item records, the curve and the final checkpoint are
written on the way (ftlab.rundir); a failure or a stop signal is recorded as such.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ftlab.config.files import load_run_config
from ftlab.config.schema import RunConfig, to_container
from ftlab.continual import continual_section, stage_totals, train_stages
from ftlab.models.structure import pad_id, resolve_device
from ftlab.rundir.layout import completed_record, locked
from ftlab.rundir.record import RunRecord
from ftlab.utils.memory import PhasePeaks
from ftlab.utils.quiet import quiet_third_party


class RunFailed(RuntimeError):
    """A run stopped; its result.json says status=failed and why."""


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _diagnostics(cfg, model, tok, tasks, run_dir: Path, device: str) -> dict:
    """eval.diagnostics of the tuned model against a fresh load of the base (full fine-tuning and PiSSA-like
    inits change the loaded one in place); tables in run_dir/diagnostics/, the summary for result.json."""
    from ftlab.eval.diagnostics import diagnose_run
    from ftlab.models.loading import load_model_and_tokenizer

    base_model, _ = load_model_and_tokenizer(cfg.model, device=device)
    try:
        return diagnose_run(model, base_model, tok, tasks, run_dir / "diagnostics", cfg.eval.diagnostics,
                            n_prompts=cfg.eval.diagnostics_n, batch_size=min(cfg.eval.batch_size, 32),
                            max_length=cfg.model.max_length)
    finally:
        del base_model


class _Quiet:
    """The logger of ranks other than 0."""

    def log(self, row: dict) -> None:
        pass

    def finish(self, result: dict) -> None:
        pass


def _unsharded_copy(cfg, sharded, method, ctx, device: str):
    """FSDP2 after training: gather the full state to rank 0 (a collective), rebuild the prepared model there,
    load it. Other ranks get None."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    from ftlab.models.loading import load_model_and_tokenizer
    from ftlab.train import distributed as dist

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main():
        return None
    seed_everything(cfg.seed)
    model, _ = load_model_and_tokenizer(cfg.model, device=device)
    model = method.prepare(model, ctx)
    missing, unexpected = model.load_state_dict(full, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"FSDP gather: state dict does not fit the rebuilt model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return model


def run_from_dir(run_dir: Path, progress: bool | None = None) -> dict:
    """Run the experiment described by run_dir/config.yaml; return the final result.json content.

    A run directory whose result.json says completed is not run again (its record is returned). One that holds
    a complete training-state checkpoint (train.save_every > 0) continues from the newest one exactly; a
    changed config.yaml is refused (ftlab.train.checkpoint.ResumeRefused, naming what changed). One process at a time
    per run directory (an advisory lock, released by the kernel even on SIGKILL)."""
    from ftlab.train import distributed as dist

    run_dir = Path(run_dir)
    if not dist.is_main():  # rank 0 of a torchrun launch holds the lock for the whole group
        # and writes everything; this rank's own record goes to a scratch directory, removed at the end
        with tempfile.TemporaryDirectory(prefix=f"ftlab-rank{dist.world()[0]}-") as scratch:
            return _run_from_dir(run_dir, progress, record_dir=Path(scratch))
    with locked(run_dir):
        return _run_from_dir(run_dir, progress)


@dataclass
class _Run:
    """What the steps of one run share, filled in as they go."""

    cfg: RunConfig
    run_dir: Path
    record: RunRecord
    device: str
    main: bool  # rank 0: evaluates and writes
    progress: bool
    resume: Any  # ftlab.train.checkpoint.Loaded, or None
    logger: Any = None
    model: Any = None
    tok: Any = None
    tasks: list = field(default_factory=list)
    val_tasks: list = field(default_factory=list)  # eval.validation: the tasks on their validation split
    val_base: Optional[dict] = None
    probes: Any = None
    train_rows: list = field(default_factory=list)
    encoded: list = field(default_factory=list)
    base: Optional[dict] = None
    method: Any = None
    ctx: Any = None
    reg: Any = None
    forward: Any = None
    memory: Any = None  # ftlab.utils.memory.PhasePeaks: peak memory of training, base and tuned evaluation


def _load(r: _Run) -> None:
    """The tokenizer, the training rows encoded and measured (a run where a row loses its whole answer stops here,
    before the model loads), model.max_length and model.prompt_format resolved into r.cfg (result.json ->
    encoding), the model, the evaluation tasks and probe texts (a missing file fails here, before any training)."""
    import sys

    from ftlab.data.sources import load_train
    from ftlab.eval.probes import build_probes
    from ftlab.eval.suites import build_tasks
    from ftlab.models.loading import load_model, load_tokenizer
    from ftlab.train.batches import encode_rows, truncation_problem

    cfg = r.cfg
    seed_everything(cfg.seed)
    r.tok = load_tokenizer(cfg.model)
    r.train_rows = load_train(cfg.data, cfg.seed)
    r.encoded, encoding = encode_rows(r.tok, r.train_rows, cfg.model.max_length, r.tok.ftlab_info["model_context"])
    refuse, message = truncation_problem(encoding, cfg.data.allow_truncation)
    if refuse:
        raise ValueError(message)
    if message and r.main:
        print(f"ftlab: warning: {message}", file=sys.stderr)
    r.cfg = cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, max_length=encoding["max_length"], prompt_format=encoding["prompt_format"]))
    r.record.update(encoding=encoding)
    r.model = load_model(cfg.model, r.tok, device=r.device)
    r.tasks = build_tasks(cfg) if r.main else []  # rank 0 alone evaluates (continual runs are one process)
    r.val_tasks = build_tasks(cfg, "validation") if r.main and cfg.eval.validation else []
    r.probes = build_probes(cfg, r.tok)  # None unless eval.probe_every > 0
    if r.main:  # what the run trains on, and how much of it each target task's eval shares (issue 11)
        from ftlab.eval.overlap import measure_overlap

        r.record.note_train_rows(r.train_rows)
        r.record.update(overlap=measure_overlap(r.train_rows, r.tasks, allow=cfg.data.allow_overlap))


def _evaluate_base(r: _Run) -> None:
    """The base model on every task, from the base cache when an identical evaluation ran before."""
    from ftlab.eval.cache import compute_signature
    from ftlab.eval.evaluate import evaluate
    from ftlab.models.loading import model_fingerprint
    from ftlab.utils.files import cache_root

    if not r.main:
        return
    cache = cache_root() / "base_eval" if r.cfg.eval.cache_base else None
    fp = model_fingerprint(r.model) if cache is not None else None
    compute = compute_signature(r.model, precision=r.cfg.hw.precision, device=r.device,
                                batch_size=r.cfg.eval.batch_size)
    with r.memory.phase("eval_base"):
        r.base = evaluate(r.model, r.tok, r.tasks, r.cfg.eval.batch_size, stage="base", run_dir=r.run_dir,
                          cache_dir=cache, fingerprint=fp, compute=compute, progress=r.progress)
        if r.val_tasks:
            r.val_base = evaluate(r.model, r.tok, r.val_tasks, r.cfg.eval.batch_size, stage="validation_base",
                                  run_dir=r.run_dir, cache_dir=cache, fingerprint=fp, compute=compute,
                                  progress=r.progress)


def _prepare(r: _Run) -> None:
    """The method wraps or freezes the model; regulariser and probes keep the base they compare against."""
    from ftlab.methods import MethodContext, build_method
    from ftlab.train import distributed as dist
    from ftlab.train.regularisers import build_regulariser

    cfg = r.cfg
    seed_everything(cfg.seed)
    r.method = build_method(cfg.method)
    r.ctx = MethodContext(tokenizer=r.tok, train_rows=r.train_rows, seed=cfg.seed, max_length=cfg.model.max_length,
                          data=cfg.data)
    r.reg = build_regulariser(cfg.reg)
    if r.reg is not None:
        r.reg.capture_base(r.model)  # before prepare: the original base, whatever the method does to it
    if r.probes is not None:
        r.probes.capture_base(r.model)  # the base, before prepare (a resume takes the checkpoint's copy)
    if getattr(cfg.hw, "kernels", False):  # Liger's RMSNorm/RoPE/SwiGLU on CUDA, before adapters wrap the linears
        from ftlab.models.liger import apply_liger

        r.record.update(liger=apply_liger(r.model, r.device))
    r.model = r.method.prepare(r.model, r.ctx)
    if cfg.hw.kernels:  # the method's own layers through ftlab.kernels (the LoRA family's fused linear)
        r.record.update(kernels=r.method.use_kernels(r.model, r.device))
    if r.reg is not None:
        r.reg.capture_start(r.model, r.ctx)
    if cfg.hw.grad_checkpointing:  # recompute activations in backward: less memory, ~30% more compute
        r.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(r.model, "enable_input_require_grads"):
            r.model.enable_input_require_grads()  # frozen embeddings (adapters) still pass gradients on
    r.forward = dist.wrap(r.model, cfg.hw)  # DDP wrapper / FSDP2 shards in place; `model` itself otherwise


def _train(r: _Run):
    """The one loop (once, or once per continual stage); (TrainResult, stage log or None)."""
    from ftlab.train import distributed as dist
    from ftlab.train.batches import Batches
    from ftlab.train.loop import LoopSettings, train

    cfg = r.cfg
    curve = None
    if cfg.eval.curve_every and r.main:  # the trajectory, for forgetting at matched gain (ftlab report)
        from ftlab.eval.curve import Curve
        from ftlab.eval.suites import first_items

        curve = Curve(first_items(r.tasks, cfg.eval.curve_limit), r.tok, cfg.eval.curve_every, cfg.eval.batch_size,
                      r.run_dir, target_skill=world_target(cfg))
    kw = dict(device=r.device, pad_id=pad_id(r.tok), run_dir=r.run_dir, on_log=r.logger.log, progress=r.progress,
              reg=r.reg, probes=r.probes, forward=r.forward, curve=curve)
    stage_log = None
    with r.memory.phase("train"):  # train.peak_mem_bytes is this phase's peak too
        if cfg.stages:  # continual: the stages in order, every stage's target scored after each (R[i][j])
            stage_log = train_stages(cfg, r.model, r.method, r.tok, r.tasks, r.resume, **kw)
            stats = stage_totals(stage_log)
        else:
            r.method.on_stage_start(r.model, 0)
            stats = train(r.model, r.method, Batches(r.encoded, cfg.train.batch_size, cfg.seed),
                          LoopSettings.of(cfg), resume_from=r.resume, **kw)
    if dist.is_sharded(r.model):  # FSDP2: rank 0 continues on a whole copy of the trained model
        r.model = _unsharded_copy(cfg, r.model, r.method, r.ctx, r.device)
    return stats, stage_log


def world_target(cfg) -> str | None:
    """The world skill a single-stage synth run fine-tunes on, for forgetting by distance (summary forgetting_near
    and forgetting_far); None otherwise (a continual run has one target per stage, its distances differ)."""
    return cfg.data.skill if cfg.data.source == "synth" and not cfg.stages else None


def _evaluate_tuned_and_record(r: _Run, stats, stage_log, t_start: float) -> None:
    """Export the trained weights, evaluate the tuned model, diagnostics, gain and forgetting into result.json."""
    from ftlab.eval.evaluate import evaluate
    from ftlab.eval.metrics import summarize
    from ftlab.eval.table import task_table
    from ftlab.train.checkpoint import save_checkpoint

    cfg, base, record = r.cfg, r.base, r.record
    save_checkpoint(r.model, r.method, r.run_dir / "checkpoints" / "final")
    with r.memory.phase("eval_tuned"):
        tuned = evaluate(r.model, r.tok, r.tasks, cfg.eval.batch_size, stage="tuned", run_dir=r.run_dir,
                         progress=r.progress)
        val_tuned = evaluate(r.model, r.tok, r.val_tasks, cfg.eval.batch_size, stage="validation_tuned",
                             run_dir=r.run_dir, progress=r.progress) if r.val_tasks else None
    if cfg.eval.diagnostics:
        record.update(diagnostics=_diagnostics(cfg, r.model, r.tok, r.tasks, r.run_dir, r.device))
    table = task_table(r.tasks, base, tuned)
    if val_tuned is not None:
        val_table = task_table(r.val_tasks, r.val_base, val_tuned)
        record.update(validation={"tasks": val_table, "summary": summarize(val_table, world_target(cfg))})
    if stage_log is not None:
        record.update(continual=continual_section(cfg, stage_log, base, tuned, r.tasks))
    record.update(summary=summarize(table, world_target(cfg)), tasks=table, memory=r.memory.record(),
                  train={**dataclasses.asdict(stats), "run_wall_s": time.perf_counter() - t_start,
                         **({"stages": [{"stage": x["stage"], "name": x["name"], **x["train"]}
                                        for x in stage_log]} if stage_log is not None else {})})
    record.complete()


def _free_training_state(r: _Run) -> None:
    """Drop the trained model and what holds copies of weights (the regulariser's and the probes' bases) before the
    post step loads its own model: its bound is one model plus one base copy."""
    import gc

    r.model = r.forward = r.reg = r.probes = r.method = r.ctx = None
    gc.collect()
    if r.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _post(r: _Run) -> None:
    """Post-training variants (ftlab.post.variants) on the tasks just scored; a failure here leaves the run completed
    (its training and tuned scores stand), says why in result.json `post_error` and fails the command."""
    from ftlab.post.variants import evaluate_variants

    try:
        evaluate_variants(r.cfg, r.run_dir, r.record, r.tok, r.tasks, r.base, r.device, val_tasks=r.val_tasks,
                          val_base=r.val_base, progress=r.progress)
    except Exception as e:
        msg = f"post: {type(e).__name__}: {e}"
        r.record.update(post_error=msg)
        (r.run_dir / "error.txt").write_text(traceback.format_exc())
        raise RunFailed(msg) from e
    if r.record.data.get("post_error"):
        r.record.update(post_error=None)


def _post_only(cfg: RunConfig, run_dir: Path, progress: bool | None) -> dict:
    """A completed run whose `post` asks for variants its record lacks: the tokenizer, the tasks and the recorded
    base scores, then the variants alone (the trained weights are read from checkpoints/final)."""
    from ftlab.eval.suites import build_tasks
    from ftlab.models.loading import load_tokenizer

    quiet_third_party()
    if cfg.hw.num_threads:
        import torch

        torch.set_num_threads(cfg.hw.num_threads)
    record = RunRecord.read(run_dir)
    enc = record.data.get("encoding") or {}
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(  # what the run itself resolved (result.json encoding)
        cfg.model, max_length=enc.get("max_length", cfg.model.max_length),
        prompt_format=enc.get("prompt_format", cfg.model.prompt_format)))
    if progress is None:
        progress = os.environ.get("FTLAB_PROGRESS", "1") != "0"
    r = _Run(cfg, run_dir, record, resolve_device(cfg.hw), True, progress, None)
    r.tok = load_tokenizer(cfg.model)
    r.tasks = build_tasks(cfg)
    r.base = _recorded_base(record.data.get("tasks") or {}, r.tasks, run_dir)
    if cfg.eval.validation:
        r.val_tasks = build_tasks(cfg, "validation")
        r.val_base = _recorded_base((record.data.get("validation") or {}).get("tasks") or {}, r.val_tasks, run_dir)
    _post(r)
    return record.data


def _recorded_base(table: dict, tasks: list, run_dir: Path) -> dict:
    missing = [t.name for t in tasks if t.name not in table]
    if missing:
        raise RunFailed(f"{run_dir}/result.json: no base score for task(s) {missing}; the eval config changed since "
                        "the run completed, so its variants cannot be compared with its base")
    return {t.name: {"score": table[t.name]["base"], "metrics": (table[t.name].get("metrics") or {}).get("base"),
                     "cached": True} for t in tasks}


def _run_from_dir(run_dir: Path, progress: bool | None, record_dir: Path | None = None) -> dict:
    cfg = load_run_config(run_dir)
    config = to_container(cfg)
    done = completed_record(run_dir)
    if done is not None:
        from ftlab.config.post import missing_variants

        if record_dir is not None or not missing_variants(cfg.post, done, str(run_dir)):
            return done
        return _post_only(cfg, run_dir, progress)  # a completed run given another `post`: no retraining
    from ftlab.train import distributed as dist
    from ftlab.train.checkpoint import ResumeRefused, check_same_config, config_sha256, latest

    resume = latest(run_dir)
    if resume is not None:
        check_same_config(resume, run_dir)  # before anything in the run directory is touched
    rank, world, _ = dist.world()
    procs = cfg.hw.nproc * cfg.hw.nnodes
    if world != procs:
        raise ResumeRefused(f"{run_dir}: configured for {procs} process(es) (hw.nproc={cfg.hw.nproc} x "
                            f"hw.nnodes={cfg.hw.nnodes}) but started on {world}; launch it with `ftlab run`, which "
                            "starts torchrun with the configured size")
    if resume is not None and int(resume.state.get("world_size", 1)) != world:
        raise ResumeRefused(f"{resume.path}: written by {resume.state.get('world_size', 1)} process(es), now "
                            f"{world}: a run resumes on the world size it started with")
    main = rank == 0
    record = RunRecord(record_dir or run_dir)  # other ranks train only: nothing of theirs goes into run_dir
    if progress is None:
        progress = os.environ.get("FTLAB_PROGRESS", "1") != "0"
    quiet_third_party()  # before transformers loads: the console is ftlab's (ftlab.utils.quiet)

    import torch

    from ftlab.report.loggers import build_logger
    from ftlab.rundir.record import env_info

    if cfg.hw.num_threads:
        torch.set_num_threads(cfg.hw.num_threads)
    device = dist.init(resolve_device(cfg.hw))
    record.start(run_dir.name, config, env_info(device, world_size=world))
    record.update(config_sha256=config_sha256(run_dir), resumed_from=None if resume is None else resume.path.name)
    r = _Run(cfg, run_dir, record, device, main, progress and main, resume, memory=PhasePeaks(device))
    try:
        t_start = time.perf_counter()
        r.logger = build_logger(cfg, run_dir, config, run_dir.name) if main else _Quiet()
        _load(r)
        _evaluate_base(r)
        _prepare(r)
        stats, stage_log = _train(r)
        if not main:
            return {}
        _evaluate_tuned_and_record(r, stats, stage_log, t_start)
    except BaseException as e:
        from ftlab.train.errors import out_of_memory_message
        from ftlab.train.preempt import Preempted

        if isinstance(e, Preempted):  # a scheduler's stop signal; the job resumes from its checkpoint
            record.update(status="preempted", preempted=e.info)
            if r.logger is not None and hasattr(r.logger, "abort"):
                r.logger.abort()
            raise
        msg = out_of_memory_message(e, r.cfg) or f"{type(e).__name__}: {e}"
        record.fail(msg)
        (record.run_dir / "error.txt").write_text(traceback.format_exc())
        if r.logger is not None and hasattr(r.logger, "abort"):
            r.logger.abort()
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise RunFailed(msg) from e
    r.logger.finish(record.data)
    if cfg.post.kind != "none":
        _free_training_state(r)
        _post(r)
    return record.data
