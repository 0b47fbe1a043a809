"""The worker: one run, from its run directory. Reads config.yaml there and never imports Hydra.

load model -> base eval (cached) -> method.prepare -> the training loop -> tuned eval -> gain/forgetting
-> result.json, per-item records, curve, final checkpoint -> loggers.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
import time
import traceback
from pathlib import Path

from ftlab.config.files import load_run_config
from ftlab.config.schema import RunConfig, to_container
from ftlab.continual import continual_section, stage_totals, train_stages
from ftlab.models.structure import resolve_device
from ftlab.rundir.layout import completed_record, locked
from ftlab.rundir.record import RunRecord
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


def out_of_memory_message(e: BaseException, cfg: RunConfig) -> str | None:
    """An allocator failure (CUDA OOM, or the CPU allocator's), said with the hw knobs that lower memory; None for
    anything else. Checkpoints are written whole or not at all, so nothing partial is left behind."""
    import torch

    text = str(e)
    if not (isinstance(e, torch.OutOfMemoryError) or isinstance(e, MemoryError)
            or (isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text))):
        return None
    hw, t = cfg.hw, cfg.train
    procs = hw.nproc * hw.nnodes
    share = t.batch_size // procs
    knobs = [f"hw.micro_batch_size={max(1, (hw.micro_batch_size or share) // 2)} (now "
             f"{hw.micro_batch_size or f'unset: {share} rows per forward'}; the global batch stays {t.batch_size})"]
    if not hw.grad_checkpointing:
        knobs.append("hw.grad_checkpointing=true")
    if hw.precision == "fp32" and hw.device != "cpu":
        knobs.append("hw.precision=bf16")
    if hw.strategy != "fsdp" and procs > 1:
        knobs.append("hw.strategy=fsdp")
    knobs.append(f"model.max_length below {cfg.model.max_length}")
    first = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
    return f"out of memory ({type(e).__name__}: {first}); lower memory with " + ", ".join(knobs)


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


def _run_from_dir(run_dir: Path, progress: bool | None, record_dir: Path | None = None) -> dict:
    cfg = load_run_config(run_dir)
    config = to_container(cfg)
    run_id = run_dir.name
    done = completed_record(run_dir)
    if done is not None:
        return done
    from ftlab.train.checkpoint import (
        ResumeRefused,
        check_same_config,
        config_sha256,
        latest,
    )

    resume = latest(run_dir)
    if resume is not None:
        check_same_config(resume, run_dir)  # before anything in the run directory is touched
    from ftlab.train import distributed as dist

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
    progress = progress and main
    quiet_third_party()  # before torch and transformers load: the console is ftlab's (ftlab.utils.quiet)

    import torch

    if cfg.hw.num_threads:
        torch.set_num_threads(cfg.hw.num_threads)
    device = dist.init(resolve_device(cfg.hw))
    from ftlab.rundir.record import env_info

    record.start(run_id, config, env_info(device, world_size=world))
    record.update(config_sha256=config_sha256(run_dir),
                  resumed_from=None if resume is None else resume.path.name)
    logger = None
    try:
        t_start = time.perf_counter()
        from ftlab.data.sources import load_train
        from ftlab.eval.evaluate import build_tasks, evaluate
        from ftlab.eval.metrics import summarize, task_entry
        from ftlab.methods import MethodContext, build_method
        from ftlab.models.loading import load_model_and_tokenizer, model_fingerprint
        from ftlab.report.loggers import build_logger
        from ftlab.train.batches import Batches, encode_example
        from ftlab.train.checkpoint import save_checkpoint
        from ftlab.train.loop import train
        from ftlab.train.regularisers import build_regulariser
        from ftlab.world.base import cache_root

        logger = build_logger(cfg, run_dir, config, run_id) if main else _Quiet()
        seed_everything(cfg.seed)
        model, tok = load_model_and_tokenizer(cfg.model, device=device)
        tasks = build_tasks(cfg) if main else []  # rank 0 alone evaluates (continual runs are one process)
        from ftlab.eval.probes import build_probes

        probes = build_probes(cfg, tok)  # None unless eval.probe_every > 0; loaded early: a missing file fails fast
        train_rows = load_train(cfg.data, cfg.seed)
        encoded = [encode_example(tok, r["prompt"], r["response"], cfg.model.max_length) for r in train_rows]

        cache = cache_root() / "base_eval" if cfg.eval.cache_base else None
        fp = model_fingerprint(model) if cache is not None else None
        base = evaluate(model, tok, tasks, cfg.eval.batch_size, stage="base", run_dir=run_dir, cache_dir=cache,
                        fingerprint=fp, progress=progress) if main else None  # rank 0 evaluates

        seed_everything(cfg.seed)
        method = build_method(cfg.method)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ctx = MethodContext(tokenizer=tok, train_rows=train_rows, seed=cfg.seed, max_length=cfg.model.max_length)
        reg = build_regulariser(cfg.reg)
        if reg is not None:
            reg.capture_base(model)  # before prepare: the original base, whatever the method does to it
        if probes is not None:
            probes.capture_base(model)  # the base, before prepare (a resume takes the checkpoint's copy)
        model = method.prepare(model, ctx)
        if reg is not None:
            reg.capture_start(model)
        batches = Batches(encoded, cfg.train.batch_size, cfg.seed)
        if cfg.hw.grad_checkpointing:  # recompute activations in backward: less memory, ~30% more compute
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()  # frozen embeddings (adapters) still pass gradients on
        forward = dist.wrap(model, cfg.hw)  # DDP wrapper / FSDP2 shards in place; `model` itself otherwise
        kw = dict(device=device, pad_id=pad_id, run_dir=run_dir, on_log=logger.log, progress=progress, reg=reg,
                  probes=probes, forward=forward)
        stage_log = None
        if cfg.stages:  # continual: the stages in order, every stage's target scored after each (R[i][j])
            stage_log = train_stages(cfg, model, method, tok, tasks, resume, **kw)
            stats = stage_totals(stage_log)
        else:
            method.on_stage_start(model, 0)
            stats = train(model, method, batches, cfg, resume_from=resume, **kw)
        if dist.is_sharded(model):  # FSDP2: rank 0 continues on a whole copy of the trained model
            model = _unsharded_copy(cfg, model, method, ctx, device)
        if not main:
            return {}
        save_checkpoint(model, method, run_dir / "checkpoints" / "final")

        tuned = evaluate(model, tok, tasks, cfg.eval.batch_size, stage="tuned", run_dir=run_dir, progress=progress)
        if cfg.eval.diagnostics:
            record.update(diagnostics=_diagnostics(cfg, model, tok, tasks, run_dir, device))
        table = {t.name: {**task_entry(t.role, t.metric, t.higher_is_better, t.unit, base[t.name]["score"],
                                       tuned[t.name]["score"], tuned[t.name]["n"]),
                          "metrics": {"base": base[t.name].get("metrics"), "tuned": tuned[t.name].get("metrics")},
                          "base_cached": base[t.name]["cached"], **t.meta}
                 for t in tasks}
        if stage_log is not None:
            record.update(continual=continual_section(cfg, stage_log, base, tuned, tasks))
        record.update(summary=summarize(table), tasks=table,
                      train={**dataclasses.asdict(stats), "run_wall_s": time.perf_counter() - t_start,
                             **({"stages": [{"stage": r["stage"], "name": r["name"], **r["train"]}
                                            for r in stage_log]} if stage_log is not None else {})})
        record.complete()
    except BaseException as e:
        from ftlab.train.preempt import Preempted

        if isinstance(e, Preempted):  # a scheduler's stop signal; the job resumes from its checkpoint (ftlab.launch.slurm_job)
            record.update(status="preempted", preempted=e.info)
            if logger is not None and hasattr(logger, "abort"):
                logger.abort()
            raise
        msg = out_of_memory_message(e, cfg) or f"{type(e).__name__}: {e}"
        record.fail(msg)
        (record.run_dir / "error.txt").write_text(traceback.format_exc())
        if logger is not None and hasattr(logger, "abort"):
            logger.abort()
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise RunFailed(msg) from e
    logger.finish(record.data)
    return record.data
