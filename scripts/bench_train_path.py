"""The training path's options on the same batches: padded (plain) vs data.packing vs hw.compile, forward + backward
of ftlab.train.loop.forward_backward on a random Llama shape, rows of skewed lengths (many short, a long tail, as
instruction data is). Reports the padding share of each layout and the median step time over alternating rounds.

    python scripts/bench_train_path.py [--hidden 256 --layers 4 --steps 6 --rounds 3 --threads 2]

Numbers, not a test: docs/performance.md ("Training path") quotes a run with its machine and date.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def rows_of(n: int, vocab: int, max_length: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = min(max_length, max(8, int(rng.lognormvariate(3.6, 0.7))))  # median ~37 tokens, tail to max
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = length // 2
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftlab.config.schema import TrainConfig
    from ftlab.train.batches import collate, pack
    from ftlab.train.loop import LoopSettings, forward_backward

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
        num_attention_heads=max(1, a.hidden // 64), num_key_value_heads=max(1, a.hidden // 128),
        max_position_embeddings=a.max_length, attn_implementation="sdpa")).train()
    batches = [rows_of(a.batch, a.vocab, a.max_length, s) for s in range(a.steps)]
    real = sum(len(r["input_ids"]) for b in batches for r in b)
    padded = sum(collate(b, 0)["input_ids"].numel() for b in batches)
    packed = sum(pack(b, a.max_length, 0)["input_ids"].numel() for b in batches)
    print(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {a.steps} batches of {a.batch} rows,"
          f" {real} real tokens; padding share: plain {1 - real / padded:.3f}, packed {1 - real / packed:.3f}")
    train = TrainConfig(grad_accum=1)
    settings = {"plain": LoopSettings(train=train, seed=0),
                "packing": LoopSettings(train=train, seed=0, packing=True, pack_length=a.max_length)}
    forwards = {"plain": model, "packing": model}
    if a.rounds:
        forwards["compile"] = torch.compile(model)
        settings["compile"] = settings["plain"]
    times: dict[str, list[float]] = {k: [] for k in forwards}
    losses: dict[str, list[float]] = {k: [] for k in forwards}
    for name in forwards:  # warm-up: compilation (the compiled forward traces each new shape once)
        for b in batches:
            forward_backward(model, b, settings[name], device="cpu", pad_id=0, forward=forwards[name])
    for _ in range(a.rounds):
        for name in forwards:  # alternating, so drift of a shared machine hits each the same
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            got = [sum(forward_backward(model, b, settings[name], device="cpu", pad_id=0, forward=forwards[name])[0])
                   for b in batches]
            times[name].append(time.perf_counter() - t)
            losses[name] = got
    base = statistics.median(times["plain"])
    for name, ts in times.items():
        m = statistics.median(ts)
        drift = max(abs(x - y) / abs(y) for x, y in zip(losses[name], losses["plain"]))
        print(f"{name:8s} median {m / a.steps * 1000:8.1f} ms/step  {real / m:9.0f} tok/s  "
              f"x{base / m:.2f} vs plain  (spread {min(ts) / a.steps * 1000:.1f}-{max(ts) / a.steps * 1000:.1f} ms)"
              f"  max rel loss diff vs plain {drift:.1e}")


if __name__ == "__main__":
    main()
