"""SLURM, for real (issue 5): a single-node cluster from Debian's slurm-wlm + munge, brought up by
scripts/slurm_cluster.sh for this module and torn down after it. No mocks: `ftlab run -m hw=slurm_cpu ...` goes
through Hydra's submitit launcher (ftlab's subclass) to sbatch; preemptions are real signals delivered by SLURM.

The sweep: 2 jobs (seeds 0 and 1), 200 steps each on the small world. Job 0 is stopped twice mid-training:
  1. `scancel --signal=USR2` (what SLURM sends signal_lead_s before the time limit, and on preemption): the job
     checkpoints at the end of its step and requeues itself;
  2. `scontrol requeue` (what an admin or a preempting scheduler does: SIGTERM, SIGKILL after KillWait): the job
     checkpoints at the end of its step and exits; SLURM requeues it.
Both runs must then equal uninterrupted in-process runs of the same configs (metrics, loss curve, final
weights), with one run directory, one completed record and one wandb run id per logical run.

Skipped only when the SLURM binaries are missing (`scripts/slurm_cluster.sh install`; .ci/run installs them).
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import FAST, SITECUSTOMIZE

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey")
STEPS = 200
CURVE_KEYS = ("step", "loss", "lr", "grad_norm", "tokens")
# log every step (the driver watches progress), checkpoint every 50 (the signals land between those)
SWEEP = [*(o for o in FAST if not o.startswith("train.max_steps=")), "hw=slurm_cpu", f"train.max_steps={STEPS}",
         "train.log_every=1", "train.save_every=50", "eval.diagnostics=[]"]

MISSING = [b for b in BINARIES if not shutil.which(b)]
if MISSING and os.environ.get("FTLAB_REQUIRE_SLURM") == "1":  # CI (.ci/run) must run these tests
    raise RuntimeError(f"FTLAB_REQUIRE_SLURM=1 but SLURM binaries are missing: {MISSING}")
needs_slurm = pytest.mark.skipif(
    bool(MISSING), reason=f"SLURM binaries absent ({', '.join(MISSING)}): run scripts/slurm_cluster.sh install "
    "(Debian: apt-get install slurm-wlm munge)")


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A private cluster for this module: the client environment (SLURM_CONF, PATH with the sacct stand-in)."""
    d = tmp_path_factory.mktemp("slurm")
    p = subprocess.run([str(SCRIPT), "up", str(d)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    env = dict(os.environ)
    for line in p.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value.replace("$PATH", os.environ["PATH"])
    assert Path(env["SLURM_CONF"]).is_file()
    yield env
    subprocess.run([str(SCRIPT), "down", str(d)], capture_output=True, text=True, timeout=120)


def sh(env, *cmd):
    return subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=60)


def submit(env, *overrides):
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "ftlab", "run", "-m", *SWEEP, *overrides], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout, time.monotonic() - t


def submitted_jobs(stdout):
    """`  <job id>  <run dir>` lines of the submit report -> {job id: run dir}."""
    jobs = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0][0].isdigit() and parts[1].startswith("/"):
            jobs[parts[0]] = Path(parts[1])
    return jobs


def events(run_dir):
    p = run_dir / "slurm.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def last_step(run_dir):
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, IndexError):
        return 0  # not there yet, or a line being written


def status(run_dir):
    try:
        return json.loads((run_dir / "result.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def wait_for(what, pred, env, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n" + sh(env, "squeue").stdout)


def reference(root, name, *overrides):
    """The same config, uninterrupted, in this process (its own directory)."""
    from ftlab.cli.run import check
    from ftlab.pipeline import run_from_dir
    from ftlab.rundir.layout import prepare_run_dir

    (cfg,) = check([*SWEEP, *overrides])
    run_dir = root / name
    prepare_run_dir(run_dir, cfg)
    assert run_from_dir(run_dir, progress=False)["status"] == "completed"
    return run_dir


def curve(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r.get(k) for k in CURVE_KEYS} for r in rows]


def final_weights(run_dir):
    from safetensors.torch import load_file

    (f,) = (run_dir / "checkpoints" / "final").glob("*.safetensors")
    return load_file(str(f))


def wandb_ids(run_dir):
    """The run id of each offline wandb run in the run directory (dirs offline-run-<time>-<id>)."""
    return [d.name.split("-", 3)[3] for d in sorted((run_dir / "wandb").glob("offline-run-*"))]


# --------------------------------------------------------------------------------------------- the sweep
@pytest.fixture(scope="module")
def sweep(slurm, tmp_path_factory, ftlab_cache):
    root = tmp_path_factory.mktemp("slurm_sweep")
    probe_out = root / "modules"
    probe_out.mkdir()
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**slurm, "FTLAB_OUTPUTS": str(root / "out"), "FTLAB_CACHE": str(ftlab_cache), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "FTLAB_PROGRESS": "0",
           # every process records the modules it loaded (conftest.SITECUSTOMIZE): jobs must not load Hydra
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "site"), slurm.get("PYTHONPATH")])),
           "FTLAB_TEST_MODULES_DIR": str(probe_out)}
    t0 = time.monotonic()
    # seed 1's reference first: it builds the small world, which the jobs then load from the shared cache
    refs = {"1": reference(root, "ref_s1", "seed=1")}
    out, submit_s = submit(env, "seed=0,1", "logger=wandb")
    jobs = submitted_jobs(out)
    assert len(jobs) == 2, out
    (j0, run0), (j1, run1) = sorted(jobs.items())
    assert run0.name.startswith("lora_synth_sub_s0_") and run1.name.startswith("lora_synth_sub_s1_"), out

    # seed 0's reference runs beside the jobs (the preempted job spends much of its time waiting for a restart)
    ref0 = threading.Thread(target=lambda: refs.update({"0": reference(root, "ref_s0", "seed=0")}))
    ref0.start()

    # 1. the time-limit / preemption warning signal, mid-training
    wait_for("job 0 training past step 20", lambda: events(run0) and last_step(run0) >= 20, env)
    assert sh(env, "scancel", "--signal=USR2", j0).returncode == 0
    stop1 = wait_for("job 0 to checkpoint and requeue itself",
                     lambda: [e for e in events(run0) if e["event"] == "stop"], env)[0]
    # 2. an external requeue (SIGTERM, SIGKILL after KillWait) once the restarted job made progress
    wait_for("job 0 restarted, training past its checkpoint",
             lambda: [e for e in events(run0) if e["event"] == "start" and e["restart"] == 1]
             and last_step(run0) >= stop1["step"] + 20, env)
    assert sh(env, "scontrol", "requeue", j0).returncode == 0
    wait_for("job 0 to checkpoint and exit", lambda: len([e for e in events(run0) if e["event"] == "stop"]) == 2,
             env)
    wait_for("both runs completed", lambda: status(run0) == status(run1) == "completed", env, timeout=240)
    wait_for("both jobs ended", lambda: all(events(r)[-1]["event"] == "end" for r in (run0, run1)), env)
    ref0.join(timeout=240)
    wall = time.monotonic() - t0
    print(f"slurm sweep: submit {submit_s:.1f} s, sweep + references {wall:.1f} s")
    return {"env": env, "root": root, "jobs": jobs, "runs": {"0": run0, "1": run1}, "refs": refs,
            "submit_out": out, "submit_s": submit_s,
            "modules": [json.loads(p.read_text()) for p in sorted(probe_out.glob("*.json"))]}


@needs_slurm
def test_preempted_sweep_equals_uninterrupted_runs(sweep):
    runs, refs = sweep["runs"], sweep["refs"]
    assert sweep["submit_s"] < 30, "submitting must not wait for the jobs"
    jobs = [m for m in sweep["modules"] if any("submitit" in a for a in m["argv"][:1])]
    assert len(jobs) >= 2, [m["argv"] for m in sweep["modules"]]  # a job killed by SLURM (requeue) may not record
    assert all("ftlab" in m["modules"] and "hydra" not in m["modules"] for m in jobs), \
        "a SLURM job must never import Hydra (it runs the frozen config.yaml)"

    # job 0: three starts (restart 0, 1, 2); stopped by USR2 (requeued itself), then by TERM (SLURM requeued it)
    ev = events(runs["0"])
    starts = [e["restart"] for e in ev if e["event"] == "start"]
    stops = [e for e in ev if e["event"] == "stop"]
    assert starts == [0, 1, 2], ev
    assert [(s["signals"], s["action"]) for s in stops] == [(["USR2"], "requeue"), (["TERM"], "exit")], stops
    s1, s2 = stops[0]["step"], stops[1]["step"]
    assert 20 <= s1 < s2 < STEPS, (s1, s2)  # both mid-training, both at step boundaries after progress
    assert [s["checkpoint"] for s in stops] == [f"step_{s1:06d}", f"step_{s2:06d}"]
    # job 1 ran once, untouched
    assert [e["event"] for e in events(runs["1"])] == ["submitted", "start", "end"]

    for seed in ("0", "1"):
        got = json.loads((runs[seed] / "result.json").read_text())
        want = json.loads((refs[seed] / "result.json").read_text())
        assert got["status"] == "completed"
        assert got["summary"] == want["summary"]
        assert {t: (v["base"], v["tuned"], v["n"]) for t, v in got["tasks"].items()} == \
               {t: (v["base"], v["tuned"], v["n"]) for t, v in want["tasks"].items()}
        for k in ("steps", "tokens", "final_loss", "trainable_params"):
            assert got["train"][k] == want["train"][k], k
        c = curve(runs[seed])
        steps = [r["step"] for r in c]  # every step once (a step-0 row when probes are on), nothing twice
        assert steps == sorted(set(steps)) and set(range(1, STEPS + 1)) <= set(steps) and steps[-1] == STEPS
        assert c == curve(refs[seed])
        a, b = final_weights(runs[seed]), final_weights(refs[seed])
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert json.loads((runs["0"] / "result.json").read_text())["resumed_from"] == f"step_{s2:06d}"

    # exactly one run directory per job, named by the config, and nothing else under runs/
    out = Path(sweep["env"]["FTLAB_OUTPUTS"])
    assert sorted(d.name for d in (out / "runs").iterdir() if d.is_dir()) == \
           sorted(r.name for r in runs.values())

    # one wandb run per logical run: every (re)start logged offline under the same id, derived from the run
    ids0, ids1 = wandb_ids(runs["0"]), wandb_ids(runs["1"])
    assert len(ids0) == 3 and set(ids0) == {runs["0"].name}, ids0
    assert ids1 == [runs["1"].name]


@needs_slurm
def test_resubmitted_sweep_skips_completed_runs(sweep):
    env, runs = sweep["env"], sweep["runs"]
    before = {s: (r / "result.json").read_bytes() for s, r in runs.items()}
    known = sorted(sh(env, "squeue", "-h", "-t", "all", "-o", "%i").stdout.split())  # ended ones too (MinJobAge)
    out, submit_s = submit(env, "seed=0,1", "logger=wandb")
    assert "nothing to submit" in out, out
    assert submitted_jobs(out) == {}
    for r in runs.values():
        assert f"completed {r}" in out, out
        assert [e["event"] for e in events(r)].count("submitted") == 1
    assert sorted(sh(env, "squeue", "-h", "-t", "all", "-o", "%i").stdout.split()) == known  # no new job
    assert {s: (r / "result.json").read_bytes() for s, r in runs.items()} == before
    assert submit_s < 30


@needs_slurm
def test_requeues_are_bounded(sweep):
    """hw.slurm.max_requeues=0: the first stop signal checkpoints, then the run fails with a clear record (no
    requeue loop); the checkpoint stays for a resubmission."""
    env = sweep["env"]
    out, _ = submit(env, "seed=2", "hw.slurm.max_requeues=0")
    ((job, run),) = submitted_jobs(out).items()
    wait_for("the job training past step 5", lambda: events(run) and last_step(run) >= 5, env)
    assert sh(env, "scancel", "--signal=USR2", job).returncode == 0
    wait_for("the job to end", lambda: [e for e in events(run) if e["event"] == "stop"]
             and sh(env, "squeue", "-h", "-j", job).stdout.strip() == "", env)
    (stop,) = [e for e in events(run) if e["event"] == "stop"]
    assert stop["action"] == "fail" and stop["restart"] == 0
    rec = json.loads((run / "result.json").read_text())
    assert rec["status"] == "failed"
    assert "hw.slurm.max_requeues=0 reached" in rec["error"] and stop["checkpoint"] in rec["error"]
    assert (run / "checkpoints" / stop["checkpoint"] / "COMPLETE").is_file()
    state = sh(env, "scontrol", "show", "job", job).stdout
    assert "JobState=FAILED" in state and "Restarts=0" in state, state


@pytest.mark.parametrize("signals,restarts,action", [
    (["USR2"], 0, "requeue"), (["USR2"], 2, "requeue"), (["USR2"], 3, "fail"),
    (["TERM"], 0, "exit"), (["USR2", "TERM"], 5, "exit"),
])
def test_stop_decision(signals, restarts, action):
    from ftlab.launch.slurm_job import decide

    assert decide(signals, restarts, max_requeues=3) == action


# ------------------------------------------------------------------------------ no cluster needed
def test_stop_signal_waits_for_the_step_boundary_inside_the_loop_only():
    """Real signals to this process: inside the training loop (deferred) a stop signal is only recorded, for the
    loop's next step-end check; outside it stops at once; a second signal while stopping never raises again."""
    import signal

    from ftlab.train import preempt

    preempt.install(("USR2", "TERM"))
    try:
        assert os.environ[preempt.ENV] == "USR2,TERM"
        with preempt.deferred():
            os.kill(os.getpid(), signal.SIGUSR2)
            assert preempt.requested() == ["USR2"]
        preempt.uninstall()
        preempt.install(("USR2", "TERM"))
        with pytest.raises(preempt.Preempted) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode
        assert e.value.signals == ["TERM"] and e.value.step is None
        os.kill(os.getpid(), signal.SIGUSR2)  # already stopping: recorded, not raised
        assert preempt.requested() == ["TERM", "USR2"]
    finally:
        preempt.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and preempt.ENV not in os.environ


@pytest.mark.parametrize("extra,key", [
    (["hw.slurm.signal_lead_s=600"], "hw.slurm.signal_lead_s: 600 s is not shorter than the time limit"),
    (["hw.slurm.signal_lead_s=10"], "hw.slurm.signal_lead_s: 10 s leaves no time to finish the current step"),
    (["hw.slurm.time_min=3"], "hw.slurm.signal_lead_s: 60 s with hw.slurm.time_min=3 leaves too little time"),
    (["hw.slurm.save_on_signal=false", "train.save_every=0"], "train.save_every: 0 with hw.slurm.save_on_signal"),
])
def test_signal_lead_without_time_to_train_is_refused_up_front(extra, key, tmp_path):
    env = {**os.environ, "FTLAB_OUTPUTS": str(tmp_path / "out")}
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "ftlab", "run", "hw=slurm_cpu", *extra], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and key in p.stderr, p.stderr
    assert time.monotonic() - t < 10
    assert not (tmp_path / "out").exists()  # refused before anything was written or submitted


def test_a_sweep_shares_one_slurm_setting():
    from ftlab.cli.run import _slurm_args, check
    from ftlab.config.registry import ConfigError

    jobs = check(["hw=slurm_cpu", "hw.slurm.time_min=10,20"], multirun=True)
    with pytest.raises(ConfigError, match="hw.slurm: the jobs of a sweep are one SLURM array"):
        _slurm_args(["-m"], jobs, True)
    # a single run goes to SLURM as a one-job sweep through ftlab's launcher; local profiles are untouched
    assert _slurm_args(["hw=slurm_cpu"], check(["hw=slurm_cpu"]), False) == \
           ["-m", "hw=slurm_cpu", "hydra/launcher=ftlab_slurm"]
    assert _slurm_args(["seed=1"], check(["seed=1"]), False) == ["seed=1"]
