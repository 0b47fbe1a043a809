"""GPU smoke test: a Llama-3.2-1B-shaped model with random weights, bf16, LoRA and full fine-tuning through `ftlab run`
on GSM8K-format rows, on one GPU and (when two or more are present) on 2 processes with DDP; prints tokens/s and
peak memory of each run. Minutes, not hours: a few dozen steps each.

    python scripts/gpu_smoke.py                 # on a GPU machine (scripts/gpu_smoke.sh keeps a dated log)
    python scripts/gpu_smoke.py --tiny          # the same path on CPU with a tiny shape (checks the script itself):
                                                # bf16, lora and full on 1 process, lora on 2 (hw=cpu2_ddp)

No download: the model is built from a LlamaConfig (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate
8192, vocabulary 128,256, as Llama-3.2-1B) and saved as an HF directory (safetensors) with a byte-level BPE tokenizer
trained here on the rows; the rows are tests/fixtures/gsm8k_mini.jsonl repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "tests" / "fixtures" / "gsm8k_mini.jsonl"
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
                tie_word_embeddings=True)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=2048, max_position_embeddings=512, tie_word_embeddings=True)


def build_model(out: Path, shape: dict) -> None:
    """A random-weight Llama of `shape` and a BPE tokenizer trained on the rows, saved as an HF directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts * 4, trainers.BpeTrainer(
        vocab_size=min(shape["vocab_size"], 4096), special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    # bf16 on disk, as Llama-3.2-1B ships (2.5 GB instead of 5)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def data_file(out: Path, repeat: int) -> Path:
    lines = [line for line in ROWS.read_text().splitlines() if line.strip()]
    path = out / "train.jsonl"
    path.write_text("\n".join(lines * repeat) + "\n")
    return path


def run(name: str, overrides: list[str], outputs: Path, env: dict) -> dict:
    """`ftlab run` in its own process; the run's record."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ftlab", "run", *overrides], env={**env, "FTLAB_OUTPUTS": str(outputs)},
                       capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    results = sorted(outputs.glob("runs/*/result.json"))
    if p.returncode != 0 or not results:
        # the record's error is the cause; stderr's tail alone can be just the "record: ..." line
        err = json.loads(results[-1].read_text()).get("error") if results else None
        print(f"{name}: FAILED (exit {p.returncode})\n{p.stderr[-3000:]}\nrecord error: {str(err)[-4000:]}", flush=True)
        return {"name": name, "failed": True}
    r = json.loads(results[-1].read_text())
    t, mem = r["train"], r.get("memory", {})
    cfg = yaml.safe_load((results[-1].parent / "config.yaml").read_text())
    row = {"name": name, "steps": t["steps"], "tokens_per_s": t["tokens_per_s"], "train_wall_s": t["wall_s"],
           "run_wall_s": wall, "peak_train_bytes": (mem.get("train") or t.get("peak_mem_bytes")),
           "peak_eval_bytes": mem.get("eval_tuned"), "trainable": t["trainable_params"], "total": t["total_params"],
           "lr": cfg["train"]["lr"] * cfg["method"].get("lr_scale", 1.0), "precision": cfg["hw"]["precision"],
           "device": r["env"].get("device_name"), "world_size": r["env"].get("world_size")}
    gib = lambda b: f"{b / 2**30:6.2f} GiB" if b else "     - GiB"  # noqa: E731
    print(f"{name:<14} {row['tokens_per_s']:>10,.0f} tok/s   peak train {gib(row['peak_train_bytes'])}, eval "
          f"{gib(row['peak_eval_bytes'])}   {row['trainable']:,} of {row['total']:,} params   {row['steps']} steps "
          f"at lr {row['lr']:g} ({row['precision']}) in {row['train_wall_s']:.1f} s (run {wall:.0f} s)", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny shape on CPU (checks the script, not the GPU)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 30; --tiny: 4)")
    ap.add_argument("--seq", type=int, default=1024, help="model.max_length")
    ap.add_argument("--single", action="store_true", help="--tiny: skip the 2-process run")
    ap.add_argument("--out", type=Path, default=None, help="keep the model and runs here (default: a temp dir)")
    args = ap.parse_args(argv)
    import torch

    gpus = 0 if args.tiny else torch.cuda.device_count()
    if not args.tiny and gpus == 0:
        print("gpu_smoke: no CUDA device visible; use --tiny to check the script on CPU", file=sys.stderr)
        return 2
    steps = args.steps or (4 if args.tiny else 30)
    work = args.out or Path(tempfile.mkdtemp(prefix="ftlab_gpu_smoke_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / ("llama_tiny" if args.tiny else "llama_3.2_1b_shape")
    if not (model_dir / "config.json").is_file():
        build_model(model_dir, TINY if args.tiny else LLAMA_1B)
    rows = data_file(work, repeat=4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "FTLAB_PROGRESS": "0", "FTLAB_CACHE": str(work / "cache")}
    common = [f"model.name_or_path={model_dir}", "data=gsm8k", f"data.path={rows}", "eval=target", "eval.limit=8",
              f"train.max_steps={steps}", "train.batch_size=8", "train.log_every=5", "data.max_new_tokens=16",
              f"model.max_length={args.seq}", "data.allow_truncation=true", "eval.cache_base=false"]
    # bf16 both ways: on CPU (--tiny) the same autocast and fp32 master weights as on the GPU
    hw, ddp = (["hw=cpu", "hw.precision=bf16"], ["hw=cpu2_ddp", "hw.precision=bf16"]) if args.tiny else \
        (["hw=gpu"], ["hw=gpu8_ddp", "hw.nproc=2"])
    print(f"ftlab gpu smoke, {time.strftime('%Y-%m-%d %H:%M %Z')}, torch {torch.__version__}, "
          f"{'CPU (--tiny)' if args.tiny else torch.cuda.get_device_name(0)} x {max(gpus, 1)}; "
          f"{steps} steps, batch 8, max_length {args.seq}", flush=True)
    rows_out = []
    for method in ("lora", "full"):
        rows_out.append(run(f"{method} 1 proc", [*common, *hw, f"method={method}"], work / f"runs_{method}_1", env))
    # 2 processes: both methods on 2+ GPUs; --tiny checks the DDP path with lora on 2 CPU processes
    for method in ("lora", "full") if gpus >= 2 else ("lora",) if args.tiny and not args.single else ():
        rows_out.append(run(f"{method} ddp x2", [*common, *ddp, f"method={method}"], work / f"runs_{method}_2", env))
    (work / "gpu_smoke.json").write_text(json.dumps(rows_out, indent=1) + "\n")
    print(f"results: {work / 'gpu_smoke.json'}")
    return 1 if any(r.get("failed") for r in rows_out) else 0


if __name__ == "__main__":
    sys.exit(main())
