"""Several processes, for real: torchrun with 2 gloo ranks on the CPU (ftlab.train.distributed, ftlab.launch.worker).

- 2 processes (DDP, and FSDP2) give the one-process run's loss curve, final weights and scores with the same global
  batch, within TOL (only the float summation order differs: the gradient is averaged over ranks);
- a 2-process run killed (SIGKILL to the whole torchrun group) at random steps resumes bit-identical to an
  uninterrupted 2-process run;
- a run directory is never continued on another world size.
The tiny local Llama + addition jsonl of tests/test_resume.py keeps every launch to a few seconds.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_resume import assets, curve, final_weights, make_run, overrides, same_weights  # noqa: F401

from ftlab.train.checkpoint import complete_checkpoints

TOL = 1e-5  # |2 ranks - 1 process| on losses (relative), weights and scores (absolute); measured ~1e-7
STEPS = 12


def two_procs(*extra):
    return ["hw=cpu2_ddp", "train.max_steps=%d" % STEPS, "method.dropout=0", *extra]


def full_ft(ovr):
    """test_resume's overrides with method=full (which has no dropout knob)."""
    return [o for o in ovr if not o.startswith("method.dropout")]


def launch(run_dir, env_extra=None, **popen):
    """What `ftlab run` does for hw.nproc > 1: torchrun ... -m ftlab.launch.worker RUN_DIR."""
    from ftlab.config.files import load_run_config
    from ftlab.launch import torchrun

    env = {**os.environ, "FTLAB_PROGRESS": "0", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("FTLAB_RESUME_DROP", None)
    return subprocess.Popen(torchrun.torchrun_command(run_dir, load_run_config(run_dir).hw), env=env, **popen)


def one_process(tmp_path, ovr):
    from ftlab.pipeline import run_from_dir

    run_dir = make_run(tmp_path, "one", [o for o in ovr if not o.startswith("hw=")] + ["hw.num_threads=1"])
    assert run_from_dir(run_dir, progress=False)["status"] == "completed"
    return run_dir


def assert_close_runs(a, b):
    ca, cb = curve(a), curve(b)
    assert [r["step"] for r in ca] == [r["step"] for r in cb]
    for ra, rb in zip(ca, cb):
        assert abs(ra["loss"] - rb["loss"]) <= TOL * abs(ra["loss"]), (ra, rb)
        assert ra["tokens"] == rb["tokens"]
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= TOL
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    for t in ra["tasks"]:
        assert abs(ra["tasks"][t]["tuned"] - rb["tasks"][t]["tuned"]) <= TOL, t
    assert rb["env"]["world_size"] == 2 and ra["env"]["world_size"] == 1


@pytest.mark.parametrize("strategy,method", [("ddp", "lora"), ("fsdp", "full")])
def test_two_processes_equal_one_with_the_same_global_batch(assets, tmp_path, ftlab_cache, strategy, method,
                                                          module_probe):
    ovr = overrides(assets, *two_procs(f"hw.strategy={strategy}", f"method={method}", "train.save_every=0"))
    ovr = full_ft(ovr) if method == "full" else ovr
    one = one_process(tmp_path, ovr)
    run_dir = make_run(tmp_path, "two", ovr)
    log = open(tmp_path / "torchrun.log", "wb")
    assert launch(run_dir, module_probe.env, stdout=log, stderr=log).wait(timeout=300) == 0, \
        (tmp_path / "torchrun.log").read_text()[-3000:]
    ranks = [r for r in module_probe.read() if r["argv"][0].endswith("worker.py")]
    assert len(ranks) == 2, [r["argv"] for r in module_probe.read()]
    assert all("torch" in r["modules"] and "hydra" not in r["modules"] for r in ranks), \
        "a torchrun rank must never import Hydra (workers read the frozen config.yaml)"
    assert not list(run_dir.glob(".rank*")), "only rank 0 writes into the run directory"
    assert_close_runs(one, run_dir)


def _pids_running(run_dir):
    """Processes whose command line names run_dir (torchrun and its ranks), from /proc."""
    pids = []
    for d in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if d.isdigit() and int(d) != os.getpid() and str(run_dir) in cmd.split("\0"):
            pids.append(int(d))
    return pids


def _latest_step(run_dir):
    done = complete_checkpoints(run_dir / "checkpoints")
    return int(done[-1].name.split("_")[1]) if done else 0


def test_two_process_run_resumes_exactly_after_sigkill(assets, tmp_path, ftlab_cache):
    extra = two_procs("train.save_every=1", "train.keep_checkpoints=2")
    ref = make_run(tmp_path, "ref", overrides(assets, *extra))
    log = open(tmp_path / "torchrun.log", "ab")
    assert launch(ref, stdout=log, stderr=log).wait(timeout=300) == 0, (tmp_path / "torchrun.log").read_text()[-3000:]

    seed = int(os.environ.get("FTLAB_CHAOS_SEED", random.SystemRandom().randrange(2**31)))
    print(f"FTLAB_CHAOS_SEED={seed}")
    rng = random.Random(seed)
    run_dir = make_run(tmp_path, "chaos", overrides(assets, *extra))
    kills = 0
    for target in sorted(rng.sample(range(2, STEPS - 3), 2)) + [None]:
        start = _latest_step(run_dir)
        p = launch(run_dir, stdout=log, stderr=log)
        if target is None:
            assert p.wait(timeout=300) == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
            break
        target = max(target, start + 1)
        deadline = time.monotonic() + 180
        while _latest_step(run_dir) < target and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert p.poll() is None, f"torchrun ended before the kill at step {target}: rc {p.returncode}"
        # torchrun and both ranks, mid-step (the ranks run in sessions of their own, so by command line)
        for pid in _pids_running(run_dir):
            os.kill(pid, signal.SIGKILL)
        p.wait()
        while _pids_running(run_dir):
            time.sleep(0.05)
        kills += 1
    assert kills == 2
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["resumed_from"] is not None
    assert curve(run_dir) == curve(ref)
    assert same_weights(final_weights(run_dir), final_weights(ref))


def test_another_world_size_is_refused(assets, tmp_path, ftlab_cache):
    """A 2-process run directory started as one process is refused before anything in it changes."""
    run_dir = make_run(tmp_path, "two", overrides(assets, *two_procs("train.max_steps=2")))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    p = subprocess.run([sys.executable, "-m", "ftlab.launch.worker", str(run_dir)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "FTLAB_PROGRESS": "0"})
    assert p.returncode == 2 and "configured for 2 process(es)" in p.stderr and "started on 1" in p.stderr, p.stderr
    assert {q: q.read_bytes() for q in run_dir.rglob("*") if q.is_file() and q.name != ".lock"} == before


def test_a_checkpoint_of_another_world_size_is_refused(assets, tmp_path, ftlab_cache):
    from ftlab.pipeline import run_from_dir
    from ftlab.train.checkpoint import ResumeRefused, latest

    run_dir = make_run(tmp_path, "one", overrides(assets, "train.max_steps=2", "train.save_every=1"))
    assert run_from_dir(run_dir, progress=False)["status"] == "completed"
    (run_dir / "result.json").unlink()  # as if it had stopped after its last checkpoint
    ck = latest(run_dir)
    state = ck.path / "state.json"
    data = json.loads(state.read_text())
    data["world_size"] = 2
    state.write_text(json.dumps(data))
    with pytest.raises(ResumeRefused, match="written by 2 process"):
        run_from_dir(run_dir, progress=False)


def test_batch_that_does_not_split_over_processes_is_refused():
    from ftlab.cli.run import check
    from ftlab.config.registry import ConfigError

    with pytest.raises(ConfigError, match="train.batch_size: 5 does not split over 2"):
        check(["hw=cpu2_ddp", "train.batch_size=5"])
    with pytest.raises(ConfigError, match="method=lisa"):
        check(["hw=cpu2_ddp", "method=lisa"])
    assert torch.distributed.is_available()


def test_out_of_memory_is_reported_with_the_knobs_that_help(assets, tmp_path, ftlab_cache, monkeypatch):
    """A real allocator failure (the CPU allocator's; CUDA's OutOfMemoryError takes the same path) in the middle
    of training: the record says out of memory and names the hw knobs; no final checkpoint, no hang."""
    import ftlab.train.loop
    from ftlab.pipeline import RunFailed, run_from_dir

    real = ftlab.train.batches.collate
    calls = []

    def collate_then_exhaust(rows, pad_id):
        calls.append(1)
        if len(calls) == 3:
            torch.empty(2**62, dtype=torch.uint8)  # raises at once: 4 EiB cannot be had
        return real(rows, pad_id)

    monkeypatch.setattr(ftlab.train.loop, "collate", collate_then_exhaust)
    run_dir = make_run(tmp_path, "oom", overrides(assets, "train.max_steps=5", "train.save_every=0"))
    with pytest.raises(RunFailed, match="out of memory") as e:
        run_from_dir(run_dir, progress=False)
    assert "hw.micro_batch_size=2" in str(e.value) and "hw.grad_checkpointing=true" in str(e.value)
    record = json.loads((run_dir / "result.json").read_text())
    assert record["status"] == "failed" and "out of memory" in record["error"]
    assert not (run_dir / "checkpoints" / "final").exists()


@pytest.mark.parametrize("knob", ["hw.micro_batch_size=1", "hw.grad_checkpointing=true"])
def test_memory_knobs_do_not_change_the_run(assets, tmp_path, ftlab_cache, knob, monkeypatch):
    """hw.micro_batch_size (forwards of fewer rows, the same global batch) and hw.grad_checkpointing (recompute
    in backward) trade speed for memory only: same curve and weights within TOL; and they do act: block forwards
    are counted through their MLPs (checkpointing recomputes each of the 2 blocks once per step; micro-batches of
    1 row run 4 per step instead of 1). The MLP, not the block, is patched: the block's forward is what
    transformers wraps for checkpointing."""
    from transformers.models.llama import modeling_llama

    from ftlab.pipeline import run_from_dir

    calls = []
    real = modeling_llama.LlamaMLP.forward

    def counted(self, *a, **k):
        if self.training:  # training forwards only: evaluation's generation length may differ by a token
            calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    ovr = overrides(assets, "train.max_steps=4", "train.save_every=0", "method.dropout=0")
    plain, changed = make_run(tmp_path, "plain", ovr), make_run(tmp_path, "changed", ovr + [knob])
    counts = []
    for d in (plain, changed):
        calls.clear()
        assert run_from_dir(d, progress=False)["status"] == "completed"
        counts.append(len(calls))
    # 4 steps x 2 blocks: 8 training forwards; checkpointing recomputes each once more in backward (16); 1-row
    # micro-batches of the 4-row batch run 4 forwards per block and step (32)
    assert counts == [8, 16 if knob.startswith("hw.grad") else 32], counts
    ca, cb = curve(plain), curve(changed)
    assert len(ca) == len(cb) == 4
    assert all(abs(a["loss"] - b["loss"]) <= TOL * a["loss"] for a, b in zip(ca, cb))
    wa, wb = final_weights(plain), final_weights(changed)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= TOL


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_profile_without_gpus_is_refused_before_anything_starts(tmp_path, ftlab_cache):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "ftlab", "run", "hw=gpu8_ddp"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, env={**os.environ, "FTLAB_OUTPUTS": str(out)})
    assert p.returncode == 2 and "hw.device=cuda" in p.stderr and "hw=cpu" in p.stderr, p.stderr[-2000:]
    assert not list(out.rglob("result.json")) and not list(out.glob("runs/*/config.yaml"))
