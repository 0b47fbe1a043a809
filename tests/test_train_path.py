"""The faster training path (issue 17): sequence packing (data.packing), torch.compile (hw.compile). Each must
leave what is trained the same: packed attention stays within a row, and the loss curve equals the plain path's."""

import json
import random

import pytest
import torch
from test_resume import assets  # noqa: F401 - fixture: a tiny local Llama and a jsonl of additions

from ftlab.train.batches import IGNORE, collate, pack, response_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(attn: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def rows_of(lengths, seed=0, prompt=3):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(1, 61) for _ in range(n)]
        out.append({"input_ids": ids, "labels": [IGNORE] * min(prompt, n) + ids[prompt:]})
    return out


def test_pack_counts_the_same_tokens_and_restarts_positions():
    rows = rows_of([7, 3, 12, 5, 1, 9, 4])
    b = pack(rows, 16, pad_id=0)
    ids, labels, pos = b["input_ids"], b["labels"], b["position_ids"]
    assert ids.shape[1] <= 16 and ids.shape[0] == 3  # 41 tokens: 3 sequences of 16 by first-fit decreasing
    assert (labels[:, 1:] != IGNORE).sum().item() == response_tokens(rows)
    # every row appears once, whole, at positions 0..n-1
    found = []
    for r in range(ids.shape[0]):
        starts = [j for j in range(ids.shape[1]) if pos[r, j] == 0] + [ids.shape[1]]
        for a, e in zip(starts, starts[1:]):
            found.append(ids[r, a:e].tolist())
            assert pos[r, a:e].tolist() == list(range(e - a))
    for row in rows:
        assert row["input_ids"] in found
    # padding: at most what the plain batch pads
    plain = collate(rows, 0)["input_ids"]
    assert ids.numel() - sum(len(r["input_ids"]) for r in rows) < plain.numel() - sum(len(r["input_ids"]) for r in rows)


def test_packing_is_refused_where_rows_would_mix():
    """Where packed rows would see each other or lose their prompt, packing is refused, naming the key."""
    from ftlab.cli.run import check
    from ftlab.config.registry import ConfigError
    from ftlab.train.loop import check_packing

    for other in ("method=prompt_tuning", "reg=kl"):
        with pytest.raises(ConfigError, match="data.packing: .*set data.packing=false"):
            check(["data.packing=true", other])
    check_packing(tiny_llama("eager"))  # transformers' Llama builds its mask from the position ids
    with pytest.raises(ValueError, match="data.packing: the model's code .* create_causal_mask"):
        check_packing(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_attention_does_not_cross_examples(attn):
    """A packed batch's logits, row by row, equal each row run alone (float32; 1e-5 absolute)."""
    model = tiny_llama(attn)
    rows = rows_of([9, 4, 13, 6, 2])
    b = pack(rows, 20, pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        r = 0
        for i in range(b["input_ids"].shape[0]):
            starts = [j for j in range(b["input_ids"].shape[1]) if b["position_ids"][i, j] == 0]
            for a, e in zip(starts, starts[1:] + [b["input_ids"].shape[1]]):
                seg = b["input_ids"][i, a:e]
                alone = model(input_ids=seg[None]).logits[0]
                assert torch.allclose(packed[i, a:e], alone, atol=1e-5, rtol=0), (attn, i, a, e)
                r += 1
    assert r >= len(rows)  # every row (plus any padding tail) checked
    # the check can fail: with a KV cache (use_cache defaults to true) transformers ignores the restarts
    with torch.no_grad():
        crossed = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits  # a cache: no packing
    assert not torch.allclose(crossed, packed, atol=1e-3)


def _curve(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["loss"] is not None]  # not the base's probe row


# the loss is a mean over the same response tokens either way; packing changes only the summation order and the
# attention shapes (compile: the kernels), so on float32 the curves agree to float rounding: measured <= 3e-7
# relative over 4 steps of Adam; 1e-5 leaves room for another CPU's summation order
LOSS_RTOL = 1e-5


@pytest.mark.parametrize("knob", ["data.packing=true", "hw.compile=true"])
def test_loss_curve_equals_the_plain_path(assets, tmp_path, ftlab_cache, knob):
    """The tiny local Llama of test_resume (LoRA with dropout, batch 4 of additions of different lengths): the
    per-step loss with the knob equals the plain path's, on the same tokens."""
    from test_resume import make_run, overrides
    from torch._dynamo.utils import counters

    from ftlab.pipeline import run_from_dir

    steps = ["train.max_steps=4", "train.keep_checkpoints=1", "train.save_every=0"]
    counters.clear()
    fast_dir = make_run(tmp_path, "fast", overrides(assets, knob, *steps))
    run_from_dir(fast_dir, progress=False)
    assert (counters["stats"]["unique_graphs"] > 0) == (knob == "hw.compile=true")  # compiled when asked only
    plain_dir = make_run(tmp_path, "plain", overrides(assets, *steps))
    run_from_dir(plain_dir, progress=False)
    fast, plain = _curve(fast_dir), _curve(plain_dir)
    assert [r["step"] for r in fast] == [r["step"] for r in plain] == [1, 2, 3, 4]
    for a, b in zip(fast, plain):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), (knob, a, b)
        assert a["tokens"] == b["tokens"]
    assert fast_dir != plain_dir and a["loss"] != plain[0]["loss"]  # the loss moved: the steps trained


# ------------------------------------------------------------------------------------- evaluation batching
SKEWED = [160, 150] + [12, 11, 10, 9, 8] * 6 + [40, 35, 3, 2, 1]  # two long rows, many short ones, a few outliers


def test_length_batches_bound_the_padding_on_a_skewed_set():
    from ftlab.utils.padding import MAX_PADDING, length_batches, padding_fraction

    batches = length_batches(SKEWED, 8)
    assert sorted(i for b in batches for i in b) == list(range(len(SKEWED)))  # every row once
    assert all(len(b) <= 8 for b in batches)
    for b in batches:  # the bound holds batch by batch, so for the whole set
        assert padding_fraction(SKEWED, [b]) <= MAX_PADDING
    # what a fixed batch size of the same sorted order pads: the bound is doing work here
    order = sorted(range(len(SKEWED)), key=lambda i: -SKEWED[i])
    fixed = [order[i:i + 8] for i in range(0, len(order), 8)]
    assert padding_fraction(SKEWED, fixed) > 0.5 > MAX_PADDING >= padding_fraction(SKEWED, batches)
    # perplexity's token budget: no batch above max_tokens padded positions (a row longer than it runs alone)
    capped = length_batches(SKEWED, 8, max_tokens=48)
    assert all(max(SKEWED[i] for i in b) * len(b) <= 48 or len(b) == 1 for b in capped)


def test_generation_and_scoring_batches_stay_under_the_padding_bound_with_results_in_order(monkeypatch):
    """greedy_decode and multiple-choice scoring on prompts of skewed lengths: every batch's padding (measured on
    what the model is given) is at most MAX_PADDING, and the results equal one prompt at a time, in input order."""
    import test_eval

    from ftlab.eval.multiple_choice import mc_loglikelihoods
    from ftlab.models import generate
    from ftlab.utils.padding import MAX_PADDING

    tok = test_eval.make_tokenizer()
    model = test_eval.tiny_model(tok)
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "7", "plus", "the"]
    prompts = [" ".join(rng.choice(words) for _ in range(n)) for n in SKEWED[:20]]

    seen = []
    real = generate._decode_batch

    def spy(model, enc, *a, **k):
        seen.append([len(e) for e in enc])
        return real(model, enc, *a, **k)

    monkeypatch.setattr(generate, "_decode_batch", spy)
    batched = generate.greedy_decode(model, tok, prompts, 3, batch_size=8)
    for lens in seen:
        assert 1 - sum(lens) / (max(lens) * len(lens)) <= MAX_PADDING, lens
    assert len(seen) > -(-len(prompts) // 8)  # the bound split some batches
    seen.clear()
    assert batched == generate.greedy_decode(model, tok, prompts, 3, batch_size=1)

    # scoring without a shared context: every request is one left-padded row with a mask
    requests = [(tok(p)["input_ids"], tok(" beta")["input_ids"]) for p in prompts]
    masks = []
    hook = model.register_forward_pre_hook(lambda m, a, k: masks.append(k["attention_mask"]), with_kwargs=True)
    try:
        lls = mc_loglikelihoods(model, tok, requests, 8, 1024, share_context=False)
    finally:
        hook.remove()
    assert masks
    for m in masks:
        assert 1 - m.float().mean().item() <= MAX_PADDING
    one = mc_loglikelihoods(model, tok, requests, 1, 1024, share_context=False)
    assert lls == pytest.approx(one, abs=1e-4)


# ------------------------------------------------------------------------------------------------ liger
def test_liger_is_applied_only_where_it_can_run(capsys):
    """hw.kernels=true: Liger's patches need CUDA and liger_kernel; elsewhere the model is left untouched and the
    reason said. (The patched path itself runs on a GPU only: not covered by the CPU suite.)"""
    import importlib.util

    from ftlab.models.liger import apply_liger

    model = tiny_llama("eager")
    before = {n: type(m) for n, m in model.named_modules()}
    assert apply_liger(model, "cpu") is None
    if importlib.util.find_spec("liger_kernel") is None:
        assert apply_liger(model, "cuda") is None
        assert "liger_kernel is not installed" in capsys.readouterr().err
    model.config.model_type = "gpt2"
    assert apply_liger(model, "cuda") is None and "no Liger patch for model type 'gpt2'" in capsys.readouterr().err
    assert {n: type(m) for n, m in model.named_modules()} == before


# ------------------------------------------------------------------------------------------------ resume
def test_packed_run_resumes_exactly(assets, tmp_path, ftlab_cache):
    """data.packing keeps exact resume: packing is a function of the batch's rows, and the data position is the
    same Batches state as without it. A copy cut back to step 3 resumes to the same curve and weights."""
    from test_resume import curve, final_weights, make_run, overrides, resume_copy, same_weights

    from ftlab.pipeline import run_from_dir

    ref = make_run(tmp_path, "ref", overrides(assets, "train.max_steps=6", "train.keep_checkpoints=100",
                                              "data.packing=true"))
    run_from_dir(ref, progress=False)
    resumed = resume_copy(ref, tmp_path / "resumed", at_step=3)
    result = run_from_dir(resumed, progress=False)
    assert result["resumed_from"] == "step_000003"
    assert curve(resumed) == curve(ref) and [r["step"] for r in curve(ref)] == list(range(1, 7))
    assert same_weights(final_weights(resumed), final_weights(ref))
