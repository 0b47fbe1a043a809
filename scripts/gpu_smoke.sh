#!/usr/bin/env bash
# GPU smoke test (issue 10): a Llama-3.2-1B-shaped random-weight model, bf16, lora and full fine-tuning on
# GSM8K-format rows, one GPU and 2-process DDP when two or more GPUs are present; tokens/s and peak memory per run.
# Run it whenever a GPU is available and commit its log (docs/gpu_smoke/<date>.log: device, date, numbers).
#   scripts/gpu_smoke.sh            # on the GPU machine (a few minutes)
#   scripts/gpu_smoke.sh --tiny     # the same path on CPU with a tiny shape (checks the script; log in /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
if [[ " $* " == *" --tiny "* ]]; then dir="${TMPDIR:-/tmp}"; else dir=docs/gpu_smoke; mkdir -p "$dir"; fi
log="$dir/gpu_smoke_$(date -u +%Y%m%d_%H%M).log"
python scripts/gpu_smoke.py "$@" 2>&1 | tee "$log"
echo "log: $log"
