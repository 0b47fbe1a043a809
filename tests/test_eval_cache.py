"""The base-result cache cannot go stale (issue 12): every change that can move a base result misses it (the
tokenizer's behaviour and content, the model's config and stop tokens, the few-shot sample, the prediction code),
an unchanged rerun hits it, cached predictions are re-scored with today's scorer, and an lm-eval task's key is the
same in every process. lm_eval:<task> aggregates every metric as lm-eval does (perplexities, f1, mcc), with equal
numbers on the same in-memory model."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftlab.eval import cache as fcache
from ftlab.eval import multiple_choice  # noqa: F401 - registers the kind
from ftlab.eval.evaluate import evaluate
from ftlab.eval.task import KINDS, Kind, Task

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

FIX = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent


def make_tokenizer(bos: bool = True, lowercase: bool = False, template: str = "{{ m }}"):
    """The same byte-level BPE vocabulary every time (trained on one fixture); `bos`, `lowercase` (a normaliser)
    and `template` (a chat template) vary only what they name."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator((FIX / "eval" / "arc_easy.jsonl").read_text().splitlines(), trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if bos:
        bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    if lowercase:
        bpe.normalizer = normalizers.Lowercase()
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    t.chat_template = template
    return t


def tiny_model(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, attn_implementation="eager")).eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok))


def mc_task(fewshot: str = "") -> Task:
    rows = [{"id": f"q{i}", "context": f"{fewshot}Question: is {w} a colour?\nAnswer:", "choices": ["yes", "no"],
             "label": i % 2} for i, w in enumerate(["red", "stone", "blue"])]
    return Task("mc", "forget", "multiple_choice", rows, meta={"fewshot_ids": [fewshot[:8]] if fewshot else []})


def cached(model, tok, task, cache, tmp_path, **kw) -> dict:
    return evaluate(model, tok, [task], 2, stage="base", run_dir=tmp_path, cache_dir=cache, fingerprint="fp",
                    progress=False, **kw)[task.name]


# ----------------------------------------------------------------------------------------------- misses, hits
def test_each_change_that_can_move_a_base_result_misses_and_an_unchanged_rerun_hits(model, tok, tmp_path,
                                                                                    monkeypatch):
    cache = tmp_path / "cache"
    run = lambda m=model, t=tok, task=None: cached(m, t, task or mc_task(), cache, tmp_path)["cached"]  # noqa: E731
    assert run() is False and run() is True

    no_bos = make_tokenizer(bos=False)  # the same vocabulary and merges, no BOS added
    assert no_bos.get_vocab() == tok.get_vocab() and no_bos("a")["input_ids"] != tok("a")["input_ids"]
    assert run(t=no_bos) is False
    assert run(t=make_tokenizer(lowercase=True)) is False  # a normaliser
    assert run(t=make_tokenizer(template="{{ m }}!")) is False  # a chat template

    other_config = copy.deepcopy(model)  # the same weights (and fingerprint), another config
    other_config.config.rms_norm_eps = 1e-3
    assert run(m=other_config) is False
    other_eos = copy.deepcopy(model)  # the same weights, one more stop token for generation
    other_eos.generation_config.eos_token_id = [2, 3]
    assert run(m=other_eos) is False

    assert run(task=mc_task("Question: is green a colour?\nAnswer: yes\n\n")) is False  # a few-shot sample
    assert run(task=mc_task("Question: is sand a colour?\nAnswer: no\n\n")) is False  # another one

    real = fcache.prediction_code
    monkeypatch.setattr(fcache, "prediction_code", lambda kind: real(kind) + "-edited")  # the prediction code
    assert run() is False
    monkeypatch.setattr(fcache, "prediction_code", real)
    assert run() is True  # nothing of the above disturbed the first entry


def test_prediction_code_hash_follows_prediction_code_not_scoring_code_or_comments(monkeypatch):
    """The key's code hash is derived from the source: the kind module's scorer and the helpers only it reaches
    are left out (a scoring fix re-scores, it does not re-run), its predictor and what it reaches are in;
    comments and docstrings change nothing."""
    import inspect

    from ftlab.eval import multiple_choice as mc

    src, real = inspect.getsource(mc), inspect.getsource
    score_only = frozenset(fcache._reached(mc, "score_multiple_choice") - fcache._reached(mc, "predict_multiple_choice"))
    assert {"score_multiple_choice", "_argmax", "mc_choice_lengths"} <= score_only
    assert "encode_pairs" in fcache._reached(mc, "predict_multiple_choice") and "encode_pairs" not in score_only
    base = fcache._code(mc, score_only)

    def code_with(edited: str) -> str:
        assert edited != src
        monkeypatch.setattr(inspect, "getsource", lambda m: edited if m is mc else real(m))
        return fcache._code(mc, score_only)

    assert code_with(src.replace("def encode_pairs(", "# why, not what\ndef encode_pairs(", 1)) == base
    assert code_with(src.replace("    best = 0\n", "    best = 1\n", 1)) == base  # _argmax: scoring only
    assert code_with(src.replace("def _trim_context(ctx", "def _trim_context(ctx2", 1)) != base  # predicting
    monkeypatch.setattr(inspect, "getsource", real)
    assert len(fcache.prediction_code("multiple_choice")) == 64


def test_a_scoring_change_rescores_cached_predictions_without_predicting(model, tok, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = cached(model, tok, mc_task(), cache, tmp_path)
    (entry,) = [json.loads(p.read_text()) for p in cache.glob("*.json")]
    assert [set(p) for p in entry["predictions"]] == [{"id", "loglikelihoods"}] * 3  # raw, not scored
    old = KINDS.get("multiple_choice")

    def predict(*a, **k):
        raise AssertionError("a scoring change must not re-run the model")

    def score(task, preds):  # a "fixed" scorer: every item right
        metrics, items = old.score(task, preds)
        return {**metrics, "acc": 100.0}, [{**i, "acc": 100.0, "score": 100.0} for i in items]

    monkeypatch.setitem(KINDS._entries, "multiple_choice", Kind("multiple_choice", old.metrics, predict, score))
    again = cached(model, tok, mc_task(), cache, tmp_path)
    assert first["score"] < 100.0 and again["cached"] is True and again["score"] == 100.0
    recs = [json.loads(x) for x in (tmp_path / "records" / "base" / "mc.jsonl").open()]
    assert [r["score"] for r in recs] == [100.0] * 3


def test_a_cached_entry_todays_scorer_refuses_is_predicted_again(model, tok, tmp_path):
    cache = tmp_path / "cache"
    first = cached(model, tok, mc_task(), cache, tmp_path)
    (path,) = cache.glob("*.json")
    entry = json.loads(path.read_text())
    entry["predictions"][0]["loglikelihoods"] = [0.0]  # one log-likelihood for two choices
    path.write_text(json.dumps(entry))
    again = cached(model, tok, mc_task(), cache, tmp_path)
    assert again["cached"] is False and again["score"] == first["score"]
    assert cached(model, tok, mc_task(), cache, tmp_path)["cached"] is True


# -------------------------------------------------------------------------------------------- lm_eval tasks
def lm_eval_dir(tmp_path: Path, task: str, rel: str, splits: dict) -> Path:
    """One of lm-eval's own task directories as shipped (its YAML includes and !function helpers), plus a YAML
    named ftlab_<task> that includes it with the data pointed at local files (split -> path)."""
    lm_eval = pytest.importorskip("lm_eval")
    src = Path(os.path.dirname(lm_eval.__file__)) / "tasks" / Path(rel).parent
    d = tmp_path / "tasks" / task
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("__pycache__", "*.md"))
    files = "".join(f"    {s}: {p}\n" for s, p in splits.items())
    split_keys = "".join(f"{k}_split: {k if k in splits else 'null'}\n" for k in ("training", "validation", "test"))
    (d / f"ftlab_{task}.yaml").write_text(
        f"include: {Path(rel).name}\ntask: ftlab_{task}\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n{files}{split_keys}")
    return d.parent


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


KEY_SCRIPT = """
import json, sys
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from ftlab.eval.cache import cache_key
from ftlab.eval.lm_eval_adapter import load_lm_eval_task
inc, tok_dir = sys.argv[1], sys.argv[2]
task = load_lm_eval_task("ftlab_winogrande", include_path=inc, num_fewshot=1)
tok = AutoTokenizer.from_pretrained(tok_dir)
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))
print(json.dumps({"key": cache_key(task, "fp", tok, model=model), "config": task.meta["task_config_sha256"]}))
"""


WINO_TRAIN = [{"sentence": s, "option1": a, "option2": b, "answer": ans} for s, a, b, ans in [
    ("The trophy does not fit in the suitcase because the _ is too big.", "trophy", "suitcase", "1"),
    ("The trophy does not fit in the suitcase because the _ is too small.", "trophy", "suitcase", "2"),
    ("Anna thanked Beth because _ had helped her.", "Anna", "Beth", "2"),
    ("The ball broke the window because the _ was fragile.", "ball", "window", "2")]]


def test_an_lm_eval_task_with_functions_has_the_same_key_in_every_process(tok, tmp_path):
    """lm-eval's own winogrande (doc_to_text/doc_to_target/doc_to_choice are !function entries, whose reprs hold
    memory addresses) at 1-shot: another process computes the same key as this one (the tokenizer, model config
    and few-shot draws in it; the draws were unseeded before); a changed few-shot pool changes it."""
    from ftlab.eval.cache import cache_key
    from ftlab.eval.lm_eval_adapter import load_lm_eval_task

    train = Path(jsonl(tmp_path / "train.jsonl", WINO_TRAIN))
    inc = lm_eval_dir(tmp_path, "winogrande", "winogrande/default.yaml",
                      {"train": train, "validation": FIX / "eval" / "winogrande.jsonl"})
    (inc / "winogrande" / "ftlab_winogrande.yaml").write_text(
        (inc / "winogrande" / "ftlab_winogrande.yaml").read_text().replace("training_split: null",
                                                                           "training_split: train"))
    tok.save_pretrained(tmp_path / "tok")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", KEY_SCRIPT, str(inc), str(tmp_path / "tok")], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    there = json.loads(out.stdout.strip().splitlines()[-1])
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    task = load_lm_eval_task("ftlab_winogrande", include_path=str(inc), num_fewshot=1)
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "tok")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok2), hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    assert there == {"key": cache_key(task, "fp", tok2, model=model), "config": task.meta["task_config_sha256"]}
    assert "0x" not in json.dumps(task.signature())
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same examples, another few-shot draw
    moved = load_lm_eval_task("ftlab_winogrande", include_path=str(inc), num_fewshot=1)
    assert [r["doc_sha"] for r in moved.rows] == [r["doc_sha"] for r in task.rows]
    assert cache_key(moved, "fp") != cache_key(task, "fp")


def _simple_evaluate(model, tok, inc: Path, name: str):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(inc), include_defaults=False)
    return lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu"),
                                   tasks=[name], task_manager=tm, bootstrap_iters=0, verbosity="ERROR")["results"][name]


PAGES = [{"page": " = Valkyria Chronicles = \n\n Senjou no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ "
                  "playing video game developed by Sega , released in January 2011 in Japan . \n"},
         {"page": " = Tower = \n\n The tower is 324 metres ( 1 @,@ 063 ft ) tall , about the same height as an "
                  "81 @-@ storey building . \n"}]


def test_lm_eval_word_perplexity_uses_lm_evals_aggregation_and_is_not_points(model, tok, tmp_path):
    """lm-eval's wikitext (loglikelihood_rolling, word_perplexity aggregated by weighted_perplexity over
    (loglikelihood, words) pairs): it no longer crashes; equal to lm-eval's simple_evaluate; unit ppl, lower is
    better, not x100; cached and re-scored like any task."""
    from ftlab.eval.lm_eval_adapter import load_lm_eval_task

    inc = lm_eval_dir(tmp_path, "wikitext", "wikitext/wikitext.yaml", {"test": jsonl(tmp_path / "p.jsonl", PAGES)})
    theirs = _simple_evaluate(model, tok, inc, "ftlab_wikitext")
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        task = load_lm_eval_task("ftlab_wikitext", "forget", include_path=str(inc),
                                 metric=None if metric == "word_perplexity" else metric)
        assert task.metric == metric and task.higher_is_better is False
        assert task.unit == ("bits/byte" if metric == "bits_per_byte" else "ppl")
        res = cached(model, tok, task, tmp_path / "cache", tmp_path)
        assert res["cached"] is False and res["score"] == pytest.approx(theirs[f"{metric},none"], rel=1e-6)
        assert cached(model, tok, task, tmp_path / "cache", tmp_path)["score"] == res["score"]


CB = [{"premise": p, "hypothesis": h, "label": lab, "idx": i} for i, (p, h, lab) in enumerate([
    ("It was raining all day.", "The ground was wet", 0), ("He never left the house.", "He went to Paris", 1),
    ("She might come later.", "She will come", 2), ("The shop is closed on Sundays.", "The shop opens Sunday", 1),
    ("All the birds flew south.", "The birds left", 0), ("Nobody knows his name.", "His name is Tom", 2)])]
COLA = [{"sentence": s, "label": lab, "idx": i} for i, (s, lab) in enumerate([
    ("The cat sat on the mat.", 1), ("Mat the on sat cat the.", 0), ("She reads books.", 1),
    ("Books she reads the quickly of.", 0), ("We went home early.", 1), ("Home went early we the.", 0)])]


def test_lm_eval_f1_and_mcc_use_lm_evals_aggregations(model, tok, tmp_path):
    """super_glue's cb (f1 by its own !function aggregation over (prediction, gold) pairs; in [0, 1], so points)
    and glue's cola (mcc, matthews_corrcoef over pairs; in [-1, 1], reported as is): equal to lm-eval's
    simple_evaluate on the same in-memory model."""
    pytest.importorskip("sklearn")
    from ftlab.eval.lm_eval_adapter import load_lm_eval_task

    inc = lm_eval_dir(tmp_path, "cb", "super_glue/cb/default.yaml",
                      {"validation": jsonl(tmp_path / "cb.jsonl", CB)})
    lm_eval_dir(tmp_path, "cola", "glue/cola/default.yaml", {"validation": jsonl(tmp_path / "cola.jsonl", COLA)})
    cb, cola = _simple_evaluate(model, tok, inc, "ftlab_cb"), _simple_evaluate(model, tok, inc, "ftlab_cola")
    f1 = load_lm_eval_task("ftlab_cb", include_path=str(inc), metric="f1")
    assert f1.unit == "points" and f1.meta["aggregation"].endswith("cb_multi_fi")
    res = cached(model, tok, f1, tmp_path / "cache", tmp_path)
    assert res["score"] == pytest.approx(100 * cb["f1,none"], abs=1e-9)
    assert cached(model, tok, f1, tmp_path / "cache", tmp_path) == {**res, "cached": True}  # re-scored from the cache
    acc = load_lm_eval_task("ftlab_cb", include_path=str(inc))
    assert acc.metric == "acc" and cached(model, tok, acc, tmp_path / "c2", tmp_path)["score"] == \
        pytest.approx(100 * cb["acc,none"])
    mcc = load_lm_eval_task("ftlab_cola", include_path=str(inc))
    assert mcc.metric == "mcc" and mcc.unit == "mcc" and mcc.meta["aggregation"] == "matthews_corrcoef"
    assert cached(model, tok, mcc, tmp_path / "cache", tmp_path)["score"] == pytest.approx(cola["mcc,none"], abs=1e-9)


def test_lm_eval_hellaswag_and_builtin_hellaswag_report_the_same_primary_metric(tmp_path):
    from ftlab.eval.builtin import BUILTINS
    from ftlab.eval.lm_eval_adapter import load_lm_eval_task

    inc = lm_eval_dir(tmp_path, "hellaswag", "hellaswag/hellaswag.yaml",
                      {"validation": FIX / "eval" / "hellaswag.jsonl"})
    task = load_lm_eval_task("ftlab_hellaswag", include_path=str(inc), n=2)
    assert task.metric == BUILTINS.get("hellaswag").metric == "acc_norm"
    assert (task.unit, task.higher_is_better, task.meta["aggregation"]) == ("points", True, "mean")
