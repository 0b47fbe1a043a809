#!/usr/bin/env bash
# The GPU benchmarks of issue 17 in one short run (about 5 minutes on an H100/H200): scripts/bench_kernels.py --gpu
# (ftlab's kernels vs torch eager and torch.compile, bf16, triton.testing.do_bench) and scripts/bench_train.py --gpu
# (ftlab vs HF Trainer + PEFT on a Llama-3.2-1B-shaped random-weight model, LoRA r=16 all-linear and full
# fine-tuning, rows up to 2048 tokens padded; then the same with data.packing=true when this ftlab has it). Tables go
# to docs/perf/<date>_*.md (+ .json), with the device, nvidia-smi's clocks and the date; copy them into
# docs/performance.md and commit.
#   scripts/gpu_bench.sh              # on the GPU machine
#   scripts/gpu_bench.sh --cpu-check  # the same calls on the CPU at the smallest sizes (checks the script; /tmp)
# Each benchmark has its own time limit (580 s in all: one device command may run 600 s), so one that hangs leaves
# the others' tables (and the device time) intact.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python
stamp=$(date -u +%Y%m%d_%H%M)
if [[ " $* " == *" --cpu-check "* ]]; then
  out="${TMPDIR:-/tmp}/gpu_bench_check"; mkdir -p "$out"
  kern=(--small --repeats 3 --threads 1); train=(--quick --steps 3 --warmup 1 --pairs 1 --threads 1); pack=(--quick --steps 3 --warmup 1 --pairs 1 --threads 1)
else
  out=docs/perf; mkdir -p "$out"
  kern=(--gpu); train=(--gpu); pack=(--gpu --methods lora)
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv \
    | tee "$out/${stamp}_device.txt"
fi
log="$out/${stamp}_gpu_bench.log"
status=0
run() {  # run NAME LIMIT_S ARGS...: one benchmark under its own time limit; a failure is logged, the rest still run
  local name=$1 limit=$2; shift 2
  echo "== $name: $* (limit ${limit}s)" | tee -a "$log"
  timeout "$limit" "$PY" "$@" 2>&1 | grep -v "kernels-community" | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [[ $rc -ne 0 ]] && { echo "== $name FAILED (exit $rc)" | tee -a "$log"; status=1; }
  return 0
}
run kernels 200 scripts/bench_kernels.py "${kern[@]}" --json "$out/${stamp}_kernels.json" --md "$out/${stamp}_kernels.md"
run train 260 scripts/bench_train.py "${train[@]}" --json "$out/${stamp}_train.json" --md "$out/${stamp}_train.md"
run train_packed 120 scripts/bench_train.py "${pack[@]}" --data packing=true \
  --json "$out/${stamp}_train_packed.json" --md "$out/${stamp}_train_packed.md"
echo "tables: $out/${stamp}_*.md  log: $log"
exit $status
