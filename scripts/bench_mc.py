"""Benchmark (not a test): ftlab's multiple-choice scorer against lm-evaluation-harness's HF backend, on the same
in-memory model and the same items. Prints both wall times, their ratio, and the largest log-likelihood gap.

    python scripts/bench_mc.py                                # random Llama (~30M), synthetic HellaSwag-like items
    python scripts/bench_mc.py --model /models/qwen2.5-0.5b --task hellaswag --path hellaswag_val.jsonl --n 500 \\
        --device cuda --dtype bfloat16

With --task/--path the items are a built-in task's (ftlab.eval.builtin); otherwise N synthetic items with a shared
context of --ctx words and 4 continuations of --cont words. Needs lm-eval (pip install lm-eval).

Both sides run in this process, on the same thread count (--threads, default torch's), alternately --repeat
times; the ratio is of the fastest run of each (the least disturbed by other processes on a shared machine).
Exact scoring bounds the ratio by the token counts: lm-eval runs k x (context + continuation) tokens per item,
ftlab context + k x continuation (printed as `token ratio`).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftlab.eval.multiple_choice import encode_pairs, mc_requests, predict_multiple_choice  # noqa: E402
from ftlab.eval.scoring import score_predictions  # noqa: E402
from ftlab.eval.suites import load_task  # noqa: E402
from ftlab.eval.task import Task  # noqa: E402

WORDS = ("the a man woman dog cat runs walks into house garden river quickly slowly then after before red blue "
         "green small large old new finds takes gives opens closes looks under over with without").split()


def synthetic_task(n: int, ctx_words: int, cont_words: int, seed: int = 0) -> Task:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ctx = " ".join(rng.choice(WORDS) for _ in range(ctx_words)).capitalize() + "."
        choices: list[str] = []
        while len(choices) < 4:  # distinct: equal choices tie, and float noise would pick between them
            c = " ".join(rng.choice(WORDS) for _ in range(rng.randint(max(1, cont_words // 2), cont_words))) + "."
            if c not in choices:
                choices.append(c)
        rows.append({"id": f"synth/{i}", "context": ctx, "choices": choices, "label": rng.randrange(4)})
    return Task("synthetic_mc", "forget", "multiple_choice", rows, metric="acc_norm")


def bpe_tokenizer():
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    lines = [" ".join(random.Random(i).sample(WORDS, 12)) for i in range(400)]
    bpe.train_from_iterator(lines, trainer=trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--task")
    ap.add_argument("--path")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--ctx", type=int, default=120)
    ap.add_argument("--cont", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    dtype = getattr(torch, a.dtype)
    if a.model:
        tok = AutoTokenizer.from_pretrained(a.model)
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(a.device).eval()
    else:
        tok = bpe_tokenizer()
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408,
                                             num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                                             max_position_embeddings=2048)).to(a.device, dtype).eval()
    task = (load_task(a.task, n=a.n, **({"path": a.path} if a.path else {})) if a.task
            else synthetic_task(a.n, a.ctx, a.cont))

    import lm_eval  # noqa: F401
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=a.batch_size, device=a.device)
    requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=k)
                for pairs in mc_requests(task, tok) for k, pair in enumerate(pairs)]

    def sync():
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    predict_multiple_choice(model, tok, Task(task.name, "forget", task.kind, task.rows[:4]), a.batch_size)
    sync()
    times_ours, times_theirs, cpu_ours, cpu_theirs = [], [], [], []
    for _ in range(a.repeat):  # alternate, so that a burst of load elsewhere hits both sides alike
        t, c = time.perf_counter(), time.process_time()
        ours = predict_multiple_choice(model, tok, task, a.batch_size)
        sync()
        times_ours.append(time.perf_counter() - t)
        cpu_ours.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        theirs = lm.loglikelihood(requests, disable_tqdm=True)
        sync()
        times_theirs.append(time.perf_counter() - t)
        cpu_theirs.append(time.process_time() - c)
    t_ours, t_theirs = min(times_ours), min(times_theirs)
    pairs = encode_pairs(tok, [p for pairs in mc_requests(task, tok) for p in pairs])
    full = sum(len(c) + len(x) - 1 for c, x in pairs)
    ctxs = {tuple(c) for c, _ in pairs}
    shared = sum(len(c) for c in ctxs) + sum(max(len(x) - 1, 0) for _, x in pairs)

    flat = [x for p in ours for x in p["loglikelihoods"]]
    gap = max(abs(x - y[0]) for x, y in zip(flat, theirs))
    ours_acc = score_predictions(task, ours)["metrics"]
    k, theirs_preds = 0, []
    for p in ours:
        m = len(p["loglikelihoods"])
        theirs_preds.append({"id": p["id"], "loglikelihoods": [y[0] for y in theirs[k:k + m]]})
        k += m
    theirs_acc = score_predictions(task, theirs_preds)["metrics"]
    print(f"items {len(task.rows)}  requests {len(requests)}  device {a.device}  dtype {a.dtype}  "
          f"threads {torch.get_num_threads()}  load {os.getloadavg()[0]:.2f}")
    print(f"ftlab   {t_ours:8.2f} s (runs {', '.join(f'{x:.2f}' for x in times_ours)})   {ours_acc}")
    print(f"lm-eval {t_theirs:8.2f} s (runs {', '.join(f'{x:.2f}' for x in times_theirs)})   {theirs_acc}")
    print(f"speed-up {t_theirs / t_ours:.2f}x (wall)  {min(cpu_theirs) / min(cpu_ours):.2f}x (process CPU time: "
          f"{min(cpu_ours):.2f} vs {min(cpu_theirs):.2f} s; less sensitive to other load on one thread)   "
          f"token ratio {full / shared:.2f}   max |loglik gap| {gap:.2e}")


if __name__ == "__main__":
    main()
