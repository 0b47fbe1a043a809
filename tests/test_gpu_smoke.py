"""scripts/gpu_smoke.py (issue 10) in its CPU mode: the same path as on a GPU (a random-weight Llama built and saved
here, `ftlab run` on GSM8K-format rows in bf16, lora and full on one process, lora on two), with a tiny shape, so the
script works when a GPU machine is finally lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_smoke_script_runs_end_to_end_on_cpu(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--tiny", "--steps", "2",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "gpu_smoke.json").read_text())}
    assert set(rows) == {"lora 1 proc", "full 1 proc", "lora ddp x2"}
    for name, r in rows.items():
        assert r["steps"] == 2 and r["tokens_per_s"] > 0 and r["peak_train_bytes"] > 0 and r["precision"] == "bf16"
        assert r["world_size"] == (2 if "ddp" in name else 1)
        # train.lr null on a real model: the method's default (ftlab.config.method default_lr)
        assert r["lr"] == (1e-5 if name.startswith("full") else 1e-4)
    assert rows["full 1 proc"]["trainable"] == rows["full 1 proc"]["total"] > rows["lora 1 proc"]["trainable"]
    assert "tok/s" in p.stdout and "peak train" in p.stdout
