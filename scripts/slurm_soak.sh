#!/usr/bin/env bash
# Cluster soak (issue 11): a sweep of N tiny jobs on the local SLURM cluster, preempted at random while they train,
# checked against uninterrupted in-process runs of the same configs. Not CI: minutes on 2 cores.
#
#   scripts/slurm_soak.sh [N_JOBS]          default 50; SOAK_SEED (default 0) seeds the preemption schedule
#
# What it does:
#   1. brings up a private cluster (scripts/slurm_cluster.sh up) in a fresh directory, torn down on exit;
#   2. runs the reference of every job in this process (check -> prepare_run_dir -> run_from_dir; the first one
#      builds the small world into the soak's own FTLAB_CACHE, which the jobs then share);
#   3. submits `ftlab run -m hw=slurm_cpu seed=0..N-1` (one SLURM array) and, while jobs train, picks running jobs
#      at random and preempts them: `scancel --signal=USR2` (the job checkpoints and requeues itself),
#      `scontrol requeue` (SIGTERM; SLURM requeues it), or `scancel` (the job is gone: the sweep is resubmitted
#      at the end and the resubmission must skip every completed run and resume the cancelled ones);
#      at most 2 preemptions per job (hw.slurm.max_requeues=5);
#   4. checks every run: result.json completed, exactly one `end` event (status completed) in slurm.jsonl and no
#      start after it, and summary, per-task scores and the training curve (step, loss, lr, grad_norm, tokens)
#      equal to the uninterrupted reference.
# Prints one line per job that failed a check and a summary line; exit 0 when every job passed.
set -euo pipefail
N=${1:-50}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SOAK=${SOAK_DIR:-$(mktemp -d /tmp/ftlab-soak-XXXXXX)}
mkdir -p "$SOAK"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$ROOT/.venv/bin/activate" ]; then . "$ROOT/.venv/bin/activate"; fi
CLUSTER="$SOAK/cluster"
cleanup() { "$HERE/slurm_cluster.sh" down "$CLUSTER" >/dev/null 2>&1 || true; }
trap cleanup EXIT
eval "$("$HERE/slurm_cluster.sh" up "$CLUSTER")"
export FTLAB_OUTPUTS="$SOAK/out" FTLAB_CACHE="$SOAK/cache" OMP_NUM_THREADS=1 \
       WANDB_MODE=offline FTLAB_PROGRESS=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
cd "$ROOT"
python - "$N" "$SOAK" <<'EOF'
import contextlib
import io
import json
import random
import subprocess
import sys
import time
from pathlib import Path

N, SOAK = int(sys.argv[1]), Path(sys.argv[2])
RNG = random.Random(int(__import__("os").environ.get("SOAK_SEED", "0")))
SMALL_WORLD = ["model.world.hidden_size=32", "model.world.num_heads=4", "model.world.intermediate_size=128",
               "model.world.steps=200", "model.world.skills=[add,rev,copy,succ,cnt]"]
COMMON = [*SMALL_WORLD, "+debug=fast", "train.max_steps=200", "train.log_every=1", "train.save_every=10",
          "eval.limit=8", "data.n_train=128", "hw=slurm_cpu", "hw.slurm.max_requeues=5"]
CURVE = ("step", "loss", "lr", "grad_norm", "tokens")
T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:7.1f} s] {msg}", flush=True)


def sh(*cmd):
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)


def submit():
    p = subprocess.run([sys.executable, "-m", "ftlab", "run", "-m", *COMMON, "seed=" + ",".join(map(str, range(N)))],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        sys.exit(f"submit failed:\n{p.stdout}\n{p.stderr}")
    jobs = {}
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0][0].isdigit() and parts[1].startswith("/"):
            jobs[parts[0]] = Path(parts[1])
    return jobs, p.stdout


def events(run_dir):
    p = run_dir / "slurm.jsonl"
    try:
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []


def last_step(run_dir):
    try:
        return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    except (OSError, ValueError, IndexError, KeyError):
        return 0


def record(run_dir):
    try:
        return json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return {}


def curve(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: r.get(k) for k in CURVE} for r in rows]


def scores(rec):
    return rec.get("summary"), {t: (v.get("base"), v.get("tuned"), v.get("n")) for t, v in (rec.get("tasks") or {}).items()}


# 1. references, uninterrupted, in this process (the first builds the small world)
from ftlab.cli.run import check  # noqa: E402
from ftlab.pipeline import run_from_dir  # noqa: E402
from ftlab.rundir.layout import prepare_run_dir  # noqa: E402

refs = {}
for seed in range(N):
    (cfg,) = check([*COMMON, f"seed={seed}"])  # run here, not submitted
    d = SOAK / "ref" / f"s{seed}"
    prepare_run_dir(d, cfg)
    with contextlib.redirect_stdout(io.StringIO()):  # the references' tables would bury the soak's lines
        rec = run_from_dir(d, progress=False)
    assert rec["status"] == "completed", rec
    refs[seed] = d
log(f"{N} references done")

# 2. the sweep, preempted at random
jobs, out = submit()
log(f"submitted {len(jobs)} jobs")
runs = {int(d.name.split("_s")[-1].split("_")[0]): d for d in jobs.values()}
job_of = {d: j for j, d in jobs.items()}
hits = {d: 0 for d in jobs.values()}
actions = {"usr2": 0, "requeue": 0, "scancel": 0}
cancelled = set()
deadline = time.monotonic() + 40 * 60
while time.monotonic() < deadline:
    recs = {d: record(d).get("status") for d in jobs.values()}
    if all(s == "completed" or d in cancelled for d, s in recs.items()):
        break
    running = [d for d in jobs.values() if d not in cancelled and recs[d] == "running" and hits[d] < 2
               and 5 <= last_step(d) < 180 and events(d) and events(d)[-1]["event"] == "start"]
    if running and RNG.random() < 0.7:
        d = RNG.choice(running)
        kind = RNG.choices(["usr2", "requeue", "scancel"], weights=[5, 4, 1])[0]
        j = job_of[d]
        cmd = {"usr2": ["scancel", "--signal=USR2", j], "requeue": ["scontrol", "requeue", j],
               "scancel": ["scancel", j]}[kind]
        r = sh(*cmd)
        if r.returncode == 0:
            hits[d] += 1
            actions[kind] += 1
            if kind == "scancel":
                cancelled.add(d)
            log(f"{kind:8} job {j} at step {last_step(d)} ({d.name})")
            time.sleep(1.0)  # let the signal land before looking again
    time.sleep(0.1)
# 3. cancelled jobs: the resubmitted sweep skips what completed and resumes them
if cancelled:
    while sh("squeue", "-h").stdout.strip():
        time.sleep(1)
    again, out2 = submit()
    log(f"resubmitted: {len(again)} job(s) for {len(cancelled)} cancelled run(s)")
    if set(again.values()) != cancelled:
        print("FAIL resubmission: submitted", sorted(d.name for d in again.values()), "expected",
              sorted(d.name for d in cancelled))
    while time.monotonic() < deadline and any(record(d).get("status") != "completed" for d in jobs.values()):
        time.sleep(1)
while sh("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
    time.sleep(1)

# 4. checks
bad = 0
for seed, d in sorted(runs.items()):
    rec, ev = record(d), events(d)
    ends = [e for e in ev if e["event"] == "end"]
    problems = []
    if rec.get("status") != "completed":
        problems.append(f"status {rec.get('status')}")
    if len(ends) != 1 or ends[0].get("status") != "completed":
        problems.append(f"end events {ends}")
    elif any(e["event"] == "start" for e in ev[ev.index(ends[0]):]):
        problems.append("started again after it completed")
    ref = record(refs[seed])
    if scores(rec) != scores(ref):
        problems.append(f"scores {scores(rec)} != reference {scores(ref)}")
    try:
        if curve(d) != curve(refs[seed]):
            problems.append("training curve differs from the reference")
    except OSError as e:
        problems.append(f"no curve ({e})")
    stops = [e for e in ev if e["event"] == "stop"]
    if problems:
        bad += 1
        print(f"FAIL seed {seed} {d.name}: {'; '.join(problems)}")
    else:
        print(f"ok   seed {seed} {d.name}: {len(stops)} stop(s), {sum(e['event'] == 'start' for e in ev)} start(s)")
total_stops = sum(sum(e["event"] == "stop" for e in events(d)) for d in runs.values())
print(f"soak: {N} jobs, {N - bad} equal to their uninterrupted reference and completed exactly once, {bad} failed; "
      f"preemptions sent: {actions['usr2']} USR2, {actions['requeue']} requeue, {actions['scancel']} scancel "
      f"({total_stops} stops recorded); {time.monotonic() - T0:.0f} s")
sys.exit(1 if bad else 0)
EOF
