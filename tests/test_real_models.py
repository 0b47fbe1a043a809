"""Real architectures, end to end (issue 10): random-weight Llama, Qwen2 and Qwen3 shapes of tiny width with a
32k vocabulary and BPE tokenizers trained here with the `tokenizers` library (one with a ChatML chat template and a
pad token, one Qwen3-style template with a think block, one with a BOS, no chat template and no pad token), saved
as real model directories (save_pretrained, safetensors). `ftlab run` on GSM8K-format rows with lora and full, chat
and plain formats: the settings follow the model (model=hf), truncation is measured and recorded (and a run whose
rows lose their whole answer is refused before the model loads), chat rows and evaluation prompts are the
tokenizer's own apply_chat_template tokens with the loss on the assistant turn only, and the export reloads."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch

from ftlab.cli.run import check
from ftlab.train.batches import IGNORE, encode_example, encode_rows, truncation, truncation_problem

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K = FIXTURES / "gsm8k_mini.jsonl"
VOCAB = 32000
CONTEXT = 512
SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen3's shape: the last assistant turn carries an (empty) think block before its content.
CHATML_THINK = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                "<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama-3's shape: the template writes the BOS that the tokenizer also adds (ftlab must not double it).
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] | trim }}</s>"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}")


def _corpus() -> list[str]:
    """Generated sentences over a syllable lexicon (enough distinct words for 32k merges) plus the GSM8K rows."""
    rng = random.Random(0)
    syl = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    syl += [s + e for s in syl for e in "nrst"]
    words = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(40000)]
    text = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(8000)]
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    return text + [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows] * 20


def _bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=1, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    assert tok.get_vocab_size() == VOCAB
    return tok


def _tokenizer(bpe, kind: str):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer.from_str(bpe.to_str())
    if kind == "llama":  # BOS added by the post-processor, eos </s>, no pad token, no chat template
        t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    template = CHATML if kind == "qwen2" else CHATML_THINK
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=template)


def _model(kind: str, tok):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=CONTEXT, eos_token_id=tok.eos_token_id,
                 bos_token_id=tok.bos_token_id)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True, pad_token_id=tok.pad_token_id))
    return Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=8, tie_word_embeddings=True, pad_token_id=tok.pad_token_id))


@pytest.fixture(scope="session")
def real_models(tmp_path_factory):
    """{llama, qwen2, qwen3: model directory}, built once (~3 s)."""
    root = tmp_path_factory.mktemp("real_models")
    bpe = _bpe()
    dirs = {}
    for i, kind in enumerate(("llama", "qwen2", "qwen3")):
        tok = _tokenizer(bpe, kind)
        torch.manual_seed(i)
        d = root / kind
        _model(kind, tok).save_pretrained(d)
        tok.save_pretrained(d)
        dirs[kind] = d
    return dirs


@pytest.fixture(scope="module")
def gsm8k_files(tmp_path_factory):
    """The README's offline layout: train.jsonl and test.jsonl with GSM8K's fields."""
    root = tmp_path_factory.mktemp("gsm8k")
    lines = GSM8K.read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(lines[:11]) + "\n")
    (root / "test.jsonl").write_text("\n".join(lines[11:]) + "\n")
    return root / "train.jsonl", root / "test.jsonl"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FTLAB_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("FTLAB_PROGRESS", "0")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load_tok(d: Path, fmt: str = "auto"):
    from ftlab.config.schema import ModelConfig
    from ftlab.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig(name=d.name, name_or_path=str(d), prompt_format=fmt))


def _rows(n: int | None = None) -> list[dict]:
    from ftlab.config.schema import DataConfig
    from ftlab.data.sources import load_train

    return load_train(DataConfig(name="gsm8k", source="hf", path=str(GSM8K), answer="number"), 0)[:n]


FAST = ["eval=target", "eval.limit=2", "data.max_new_tokens=4", "train.max_steps=3", "train.batch_size=4",
        "train.warmup_steps=0", "train.log_every=1", "hw.num_threads=1"]


def _run(tmp_path, name: str, overrides: list[str]) -> tuple[Path, dict]:
    from ftlab.pipeline import RunFailed, run_from_dir
    from ftlab.rundir.layout import prepare_run_dir

    (cfg,) = check(overrides)
    run_dir = tmp_path / name
    prepare_run_dir(run_dir, cfg)
    try:
        run_from_dir(run_dir, progress=False)
    except RunFailed:
        pass
    return run_dir, json.loads((run_dir / "result.json").read_text())


# ------------------------------------------------------------------------------------------ model settings
def test_a_model_path_takes_the_generic_hf_group_not_the_tiny_worlds(real_models, gsm8k_files):
    train, test = gsm8k_files
    (run,) = check([f"model.name_or_path={real_models['llama']}", "data=gsm8k", f"data.path={train}",
                    f"data.eval_path={test}", "eval=target"])
    m = run.model
    assert (m.name, m.attn_implementation, m.dtype, m.max_length, m.prompt_format) == (
        "llama", "sdpa", "float32", None, "auto")
    (gpu,) = check([f"model.name_or_path={real_models['llama']}", "data=gsm8k", f"data.path={train}", "hw=gpu",
                    "eval=target"])
    assert gpu.model.dtype == "bfloat16"  # the profile's precision
    (tiny,) = check(["model.name_or_path=tiny"])  # the tiny world keeps its own group
    assert (tiny.model.name, tiny.model.max_length, tiny.model.attn_implementation) == ("tiny", 64, "eager")
    (named,) = check(["model=qwen2.5-0.5b", f"model.name_or_path={real_models['qwen2']}", "data=gsm8k", "eval=target"])
    assert named.model.name == "qwen2.5-0.5b" and named.model.prompt_format == "plain"


def test_the_tiny_worlds_run_names_do_not_change():
    """Nothing of issue 10 renames the tiny world's runs: data.allow_truncation stays out of the identity at its
    default, eval=quick's forgetting suite resolves to the literal it was ([world]), and the tiny model section holds
    the values it held."""
    from ftlab.config.schema import to_container
    from ftlab.rundir.identity import identity_payload, run_name

    (run,) = check([])
    assert run.data.allow_truncation is False and "allow_truncation" not in identity_payload(to_container(run))["data"]
    assert {k: v for k, v in to_container(run)["model"].items() if k != "world"} == {
        "name": "tiny", "name_or_path": "tiny", "revision": None, "trust_remote_code": False, "dtype": "float32",
        "attn_implementation": "eager", "max_length": 64, "prompt_format": "plain"}
    for method in ("lora", "full"):
        (quick,) = check([f"method={method}", "eval=quick"])
        (literal,) = check([f"method={method}", "eval=quick", "eval.forget=[world]"])
        assert quick.eval.forget == ["world"] and run_name(to_container(quick)) == run_name(to_container(literal))


def test_the_tokenizer_reports_format_and_context(real_models):
    assert _load_tok(real_models["llama"]).ftlab_info["prompt_format"] == "plain"
    info = _load_tok(real_models["qwen2"]).ftlab_info
    assert info["prompt_format"] == "chat" and info["model_context"] == CONTEXT
    assert _load_tok(real_models["qwen2"], "plain").ftlab_info["prompt_format"] == "plain"
    with pytest.raises(ValueError, match="model.prompt_format=plain"):
        _load_tok(real_models["llama"], "chat")
    tok = _load_tok(real_models["llama"])  # no pad token: eos stands in, nothing added
    assert tok.pad_token == "</s>" and not tok.ftlab_info["pad_token_added"] and len(tok) == VOCAB


def test_hub_kernels_stay_off_when_a_model_loads(real_models):
    """transformers 5.25 swaps layers for Hub kernels by default whenever the `kernels` package is installed (on an
    H200, offline, every ftlab run failed on kernels-community/rotary); ftlab loads the model's own code."""
    from ftlab.config.schema import ModelConfig
    from ftlab.models.loading import load_model

    pytest.importorskip("kernels")  # without the package transformers cannot turn them on either
    d = real_models["llama"]
    model = load_model(ModelConfig(name=d.name, name_or_path=str(d)), _load_tok(d))
    assert model.use_kernels is False


# ------------------------------------------------------------------------------------------ chat templates
@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama3"])
def test_chat_rows_are_the_templates_own_tokens_with_the_loss_on_the_assistant_turn(kind, real_models):
    from ftlab.eval.prompts import apply_format

    tok = _load_tok(real_models["llama" if kind == "llama3" else kind], "auto")
    if kind == "llama3":  # a template that writes the BOS the tokenizer adds itself
        tok.chat_template = LLAMA3
    end_of_turn = tok.convert_tokens_to_ids("</s>" if kind == "llama3" else "<|im_end|>")
    for row in _rows(4):
        user = [{"role": "user", "content": row["prompt"]}]
        conv = user + [{"role": "assistant", "content": row["response"].strip()}]
        want_prompt = tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=True)
        want_row = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        want_prompt = want_prompt["input_ids"]
        enc = encode_example(tok, row["prompt"], row["response"], None, "chat")
        assert enc["input_ids"] == want_row
        # the evaluation prompt (the data target task in chat format) is the same prefix, token for token
        assert tok(apply_format(tok, row["prompt"], "chat"), add_special_tokens=True)["input_ids"] == want_prompt
        assert want_row[:len(want_prompt)] == want_prompt
        if kind == "llama3":
            assert want_prompt.count(tok.bos_token_id) == 1
        # labels: exactly the assistant turn (its content and end-of-turn token), nothing of the prompt or after
        labels = enc["labels"]
        trained = [i for i, x in enumerate(labels) if x != IGNORE]
        assert trained == list(range(len(want_prompt), len(want_prompt) + len(trained)))
        assert [labels[i] for i in trained] == [want_row[i] for i in trained]
        assert want_row[trained[-1]] == end_of_turn and trained[-1] >= len(want_row) - 2
        answer = tok.decode([want_row[i] for i in trained], skip_special_tokens=True)
        if kind == "qwen3":
            assert answer.startswith("<think>")
            answer = answer.split("</think>", 1)[1]
        assert answer.strip() == row["response"].strip()


def test_plain_rows_are_prompt_response_eos(real_models):
    tok = _load_tok(real_models["llama"])
    row = _rows(1)[0]
    enc = encode_example(tok, row["prompt"], row["response"], None)  # the tokenizer's format: plain
    p = tok(row["prompt"])["input_ids"]
    assert p[0] == tok.bos_token_id and enc["input_ids"][:len(p)] == p
    assert enc["input_ids"][-1] == tok.eos_token_id and enc["labels"][:len(p)] == [IGNORE] * len(p)
    assert enc["labels"][len(p):] == enc["input_ids"][len(p):]


# ------------------------------------------------------------------------------------------ truncation
def test_truncation_is_counted_per_row():
    rows = [{"input_ids": list(range(10)), "labels": [IGNORE] * 6 + [6, 7, 8, 9]},  # 6 prompt + 4 answer
            {"input_ids": list(range(4)), "labels": [IGNORE] * 2 + [2, 3]},
            {"input_ids": list(range(12)), "labels": [IGNORE] * 9 + [9, 10, 11]}]
    t = truncation(rows, 8)
    assert t == {"max_length": 8, "rows": 3, "longest": 12, "rows_cut": 2, "answer_tokens": 9,
                 "answer_tokens_lost": 5, "answer_tokens_lost_pct": 55.56, "rows_answer_lost": 1, "eos_lost": 2}
    assert truncation(rows, 12)["rows_cut"] == 0


def test_max_length_null_is_the_longest_row_capped_by_the_context(real_models):
    tok = _load_tok(real_models["qwen2"])
    rows = _rows()
    enc, info = encode_rows(tok, rows, None, context=CONTEXT)
    longest = max(len(e["input_ids"]) for e in enc)
    assert info["max_length"] == longest and info["max_length_from"] == "longest training row"
    assert info["prompt_format"] == "chat" and info["truncation"]["rows_cut"] == 0
    assert truncation_problem(info, allow=False) == (False, None)
    _, capped = encode_rows(tok, rows, None, context=longest - 40)
    assert capped["max_length"] == longest - 40 and capped["max_length_from"] == "model context"
    assert capped["truncation"]["rows_cut"] >= 1 and capped["truncation"]["eos_lost"] >= 1
    refuse, msg = truncation_problem(capped, allow=False)
    assert not refuse and "model's context" in msg  # answers shortened, none lost whole: a warning
    short, info = encode_rows(tok, rows, 40)
    assert all(len(e["input_ids"]) <= 40 for e in short) and info["truncation"]["rows_answer_lost"] > 0
    refuse, msg = truncation_problem(info, allow=False)
    assert refuse and "data.allow_truncation=true" in msg and f"model.max_length={longest}" in msg


def test_a_run_whose_rows_lose_their_answers_is_refused_before_the_model_loads(real_models, tmp_path, monkeypatch):
    import ftlab.models.loading as loading

    def no_model(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", no_model)
    base = [f"model.name_or_path={real_models['llama']}", "data=gsm8k", f"data.path={GSM8K}", *FAST]
    run_dir, result = _run(tmp_path, "cut", [*base, "model.max_length=40"])
    assert result["status"] == "failed"
    err = result["error"]
    assert "lose their whole answer" in err and "model.max_length=" in err and "data.allow_truncation=true" in err
    assert not (run_dir / "checkpoints").exists()


def test_an_allowed_truncation_trains_and_is_recorded(real_models, tmp_path):
    _, result = _run(tmp_path, "cut_ok", [f"model.name_or_path={real_models['llama']}", "data=gsm8k",
                                          f"data.path={GSM8K}", *FAST, "model.max_length=40",
                                          "data.allow_truncation=true"])
    assert result["status"] == "completed", result.get("error")
    t = result["encoding"]["truncation"]
    assert result["encoding"]["max_length"] == 40 and t["rows_answer_lost"] > 0 and t["rows_cut"] == t["rows"]


# ------------------------------------------------------------------------------------------ end to end
def _reloads(run_dir: Path, model_dir: Path, method: str) -> None:
    """The export loads with transformers (full) or peft over the base (LoRA) and is not the base."""
    from transformers import AutoModelForCausalLM

    final = run_dir / "checkpoints" / "final"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 300, 4000, 12]])
    with torch.no_grad():
        want = base(ids).logits
    if method == "full":
        tuned = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    else:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), final)
    with torch.no_grad():
        got = tuned(ids).logits
    assert got.shape == want.shape and not torch.allclose(got, want)


@pytest.mark.parametrize("kind,method,fmt", [("llama", "lora", "plain"), ("qwen2", "full", "chat"),
                                             ("qwen3", "lora", "chat"), ("qwen2", "lora", "plain")])
def test_runs_end_to_end(kind, method, fmt, real_models, gsm8k_files, tmp_path):
    train, test = gsm8k_files
    d = real_models[kind]
    t0 = time.perf_counter()
    run_dir, result = _run(tmp_path, "run", [f"model.name_or_path={d}", "data=gsm8k", f"data.path={train}",
                                             f"data.eval_path={test}", f"method={method}", "train.lr=1e-3",
                                             *([] if fmt == "chat" else ["model.prompt_format=plain"]), *FAST])
    assert result["status"] == "completed", result.get("error")
    assert result["model"] == kind
    enc = result["encoding"]
    assert enc["prompt_format"] == fmt and enc["max_length_from"] == "longest training row"
    assert enc["model_context"] == CONTEXT and enc["truncation"]["rows_cut"] == 0
    assert enc["truncation"]["rows"] == 11 and enc["max_length"] == enc["truncation"]["longest"]
    task = result["tasks"]["gsm8k"]
    assert task["format"] == fmt and task["n"] == 2 and task["base"] is not None
    assert (run_dir / "records" / "tuned" / "gsm8k.jsonl").is_file()
    _reloads(run_dir, d, method)
    assert time.perf_counter() - t0 < 60


def test_the_readme_offline_command_works_as_written(real_models, gsm8k_files, tmp_path, monkeypatch):
    """README "Real models and data": `ftlab run model.name_or_path=DIR data=gsm8k data.path=train.jsonl
    data.eval_path=test.jsonl eval=target`, through the command line's own entry (few steps)."""
    from ftlab.cli.run import run_command

    monkeypatch.chdir(tmp_path)
    train, test = gsm8k_files
    code = run_command([f"model.name_or_path={real_models['qwen2']}", "data=gsm8k", f"data.path={train}",
                        f"data.eval_path={test}", "eval=target", "train.max_steps=2", "train.batch_size=4",
                        "eval.limit=2", "data.max_new_tokens=4", "hw.num_threads=1"])
    assert code == 0
    (result,) = [json.loads(p.read_text()) for p in (tmp_path / "outputs" / "runs").glob("*/result.json")]
    assert result["status"] == "completed" and result["model"] == "qwen2"
    assert result["encoding"]["prompt_format"] == "chat" and result["encoding"]["truncation"]["rows_cut"] == 0


# ------------------------------------------------------------------------------------------ eval suites
def _paths(*names: str) -> list[str]:
    return [f"eval.paths.{n}={FIXTURES / 'eval' / (f'{n}.json' if n == 'wikitext' else f'{n}.jsonl')}" for n in names]


@pytest.mark.parametrize("suite", ["quick", "standard", "biderman"])
def test_every_readme_eval_suite_runs_on_a_real_model_from_local_files(suite, real_models, gsm8k_files, tmp_path):
    """eval=quick (target + arc_easy + wikitext for a real model, with its probes and diagnostics), standard and
    biderman with every task read from a local file; eval=synth is the tiny world's own suite (refused here)."""
    train, test = gsm8k_files
    base = [f"model.name_or_path={real_models['llama']}", "data=gsm8k", f"data.path={train}", "method=lora",
            "train.max_steps=2", "train.batch_size=4", "train.warmup_steps=0", "hw.num_threads=1",
            f"eval={suite}", "eval.limit=2", "data.max_new_tokens=4"]
    paths = {"quick": _paths("arc_easy", "wikitext") + ["eval.probe_n=4", "eval.diagnostics_n=4"],
             "standard": _paths("mmlu", "arc_challenge", "arc_easy", "hellaswag", "winogrande", "boolq", "wikitext")
             + [f"eval.tasks.mmlu.fewshot_path={FIXTURES / 'eval' / 'mmlu_dev.jsonl'}", "eval.tasks.mmlu.few_shot=1"],
             "biderman": _paths("hellaswag", "arc_challenge", "winogrande") + [f"eval.paths.gsm8k={test}",
                                                                               "eval.tasks.gsm8k.few_shot=1",
                                                                               f"eval.tasks.gsm8k.fewshot_path={train}",
                                                                               "eval.tasks.gsm8k.max_new_tokens=4"]}[suite]
    _, result = _run(tmp_path, suite, [*base, *paths])
    assert result["status"] == "completed", result.get("error")
    want = {"quick": {"gsm8k", "arc_easy", "wikitext"},
            "standard": {"gsm8k", "mmlu", "arc_challenge", "arc_easy", "hellaswag", "winogrande", "boolq", "wikitext"},
            "biderman": {"gsm8k", "hellaswag", "arc_challenge", "winogrande"}}[suite]
    assert set(result["tasks"]) == want
    assert result["summary"]["forgetting"] is not None


def test_eval_synth_says_it_is_the_tiny_worlds(real_models):
    from ftlab.config.registry import ConfigError

    with pytest.raises(ConfigError, match="eval=quick"):
        check([f"model.name_or_path={real_models['llama']}", "data=gsm8k", f"data.path={GSM8K}", "eval=synth"])
