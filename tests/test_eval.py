"""Evaluation: built-in tasks on fixtures, multiple-choice scoring against a per-choice reference, perplexity
windows, scoring saved predictions (function and CLI), the base-result cache rules, suites."""

import json
import math
from pathlib import Path

import pytest
import torch

from ftlab.eval import multiple_choice as mc
from ftlab.eval import task as ftask
from ftlab.eval.builtin import BUILTINS, load_builtin
from ftlab.eval.evaluate import evaluate
from ftlab.eval.perplexity import predict_perplexity
from ftlab.eval.scoring import score_predictions
from ftlab.eval.suites import build_tasks, load_task
from ftlab.eval.task import Task

FIX = Path(__file__).parent / "fixtures"
EVAL_FIX = FIX / "eval"
MC_TASKS = ["arc_challenge", "arc_easy", "hellaswag", "winogrande", "boolq", "mmlu"]


def fixture_path(name: str) -> Path:
    # wikitext's pages are a .json list: make_tokenizer trains on the *.jsonl fixtures, and these pages stay out of it
    special = {"gsm8k": FIX / "gsm8k_mini.jsonl", "wikitext": EVAL_FIX / "wikitext.json"}
    return special.get(name, EVAL_FIX / f"{name}.jsonl")


def fewshot_path(name: str) -> Path:
    """The few-shot pool of a task's fixture (its hub few-shot split's fields). GSM8K's is its eval file itself:
    lm-eval's rule when the few-shot split is the eval split (an item never is its own example)."""
    return {"mmlu": EVAL_FIX / "mmlu_dev.jsonl", "gsm8k": fixture_path("gsm8k")}.get(
        name, EVAL_FIX / f"{name}_train.jsonl")


def fewshot_kw(name: str) -> dict:
    return {"fewshot_path": str(fewshot_path(name))}


# ------------------------------------------------------------------------------------------ tiny model
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def make_tokenizer():
    """A byte-level BPE tokenizer trained here on the fixtures (merges across word boundaries included)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    lines = [line for p in sorted(FIX.rglob("*.jsonl")) for line in p.read_text().splitlines()]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(lines, trainer=trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>")
    t.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                      "{% if add_generation_prompt %}assistant:{% endif %}"
    return t


def tiny_model(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      initializer_range=0.3, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


# --------------------------------------------------------------------------------------- built-in tasks
def test_registries_refuse_an_unknown_name_with_the_closest_one():
    assert {k: ftask.KINDS.get(k).metrics for k in ("generation", "perplexity", "multiple_choice")} == \
        {"generation": ("exact_match", "strict_match", "flexible_extract", "robust_match"),
         "perplexity": ("perplexity",), "multiple_choice": ("acc", "acc_norm")}
    with pytest.raises(ValueError, match="did you mean 'generation'"):
        Task("t", "target", "generaton", [{"id": "1", "prompt": "p", "reference": "r"}])
    with pytest.raises(ValueError, match="did you mean 'hellaswag'"):
        load_task("hellaswg")


@pytest.mark.parametrize("name", list(BUILTINS))
def test_builtin_task_loads_from_its_fixture(name):
    t = load_task(name, "forget", path=str(fixture_path(name)), **(fewshot_kw(name) if BUILTINS.get(name).few_shot else {}))
    assert t.kind == BUILTINS.get(name).kind and t.metric == BUILTINS.get(name).metric and t.rows
    assert all(r["id"].startswith(f"{name}/") for r in t.rows)
    assert len({r["id"] for r in t.rows}) == len(t.rows)
    assert t.meta["source"].startswith("file:") and len(t.meta["sha256"]) == 64
    assert t.meta["few_shot"] == BUILTINS.get(name).few_shot and t.meta["format"] == "plain"
    for r in t.rows:
        if t.kind == "multiple_choice":
            n = len(r["contexts"]) if "contexts" in r else len(r["choices"])
            assert 0 <= r["label"] < n
        elif t.kind == "generation":
            assert r["prompt"].endswith("Answer:") and r["reference"]
        else:
            assert r["text"].strip()


def test_row_formats_follow_lm_eval():
    arc = load_task("arc_challenge", path=str(fixture_path("arc_challenge"))).rows
    assert arc[0]["context"].startswith("Question: An astronomer") and arc[0]["context"].endswith("\nAnswer:")
    assert arc[0]["label"] == 2 and arc[3]["label"] == 3  # numeric answer keys "1".."4" map too
    hs = load_task("hellaswag", path=str(fixture_path("hellaswag"))).rows
    assert hs[0]["context"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs[3]["choices"][0] == " Make it twice as wide as the root ball."  # lm-eval: [step] dropped after strip
    wg = load_task("winogrande", path=str(fixture_path("winogrande"))).rows[0]
    assert wg["contexts"] == ["Sarah was a much better surgeon than Maria so Sarah",
                              "Sarah was a much better surgeon than Maria so Maria"]
    assert wg["continuation"] == "always got the harder cases." and wg["label"] == 0
    bq = load_task("boolq", path=str(fixture_path("boolq"))).rows
    assert bq[0]["choices"] == ["no", "yes"] and bq[0]["label"] == 1 and bq[4]["label"] == 0
    assert bq[0]["context"].endswith("\nQuestion: do iran and afghanistan speak the same language?\nAnswer:")
    mm = load_task("mmlu", path=str(fixture_path("mmlu"))).rows[0]
    assert mm["context"].startswith("The following are multiple choice questions (with answers) about abstract "
                                    "algebra.\n\nFind the degree")
    assert mm["context"].endswith("\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:") and mm["choices"] == list("ABCD")
    wt = load_task("wikitext_lines", path=str(fixture_path("wikitext_lines")))
    assert [r["id"] for r in wt.rows] == [f"wikitext_lines/{i}" for i in (1, 3, 4, 5, 6)]
    assert [r["id"] for r in load_task("wikitext", path=str(fixture_path("wikitext"))).rows] == \
        ["wikitext/0", "wikitext/1", "wikitext/2"]  # pages: every one is an item


def test_few_shot_examples_are_drawn_per_item_as_lm_eval_draws_them_and_recorded():
    pytest.importorskip("lm_eval")
    from lm_eval.api.samplers import ContextSampler

    rows, meta = load_builtin("arc_easy", path=str(fixture_path("arc_easy")), few_shot=2, **fewshot_kw("arc_easy"))
    assert meta["few_shot"] == 2 and meta["fewshot_source"].startswith("file:") and meta["fewshot_seed"] == 1234
    assert meta["fewshot_sampler"] == "default" and len(meta["fewshot_sample_sha256"]) == 64
    # lm-eval's default sampler, seeded once per task, one draw per doc in doc order
    pool = [json.loads(x) for x in fewshot_path("arc_easy").read_text().splitlines()]
    sampler = ContextSampler(pool, rnd=1234)
    for r in rows:
        want = [f"arc_easy/fewshot/{pool.index(d)}" for d in sampler.sample(2)]
        assert meta["fewshot_ids"][r["id"]] == want
        blocks = r["context"].split("\n\n")
        assert len(blocks) == 3 and blocks[-1].startswith("Question:")
        for b, pid in zip(blocks[:2], want):
            ex = pool[int(pid.rsplit("/", 1)[1])]
            assert b.startswith(f"Question: {ex['question']}\nAnswer: ")  # an example ends with its correct answer
    assert len({tuple(v) for v in meta["fewshot_ids"].values()}) > 1  # not the same examples for every item
    # a limit keeps each item's draw: item i's prompt is the same with or without it (lm-eval's --limit too)
    assert load_builtin("arc_easy", path=str(fixture_path("arc_easy")), few_shot=2, n=2, **fewshot_kw("arc_easy"))[0] \
        == rows[:2]
    with pytest.raises(ValueError, match=r"eval.tasks.arc_easy.fewshot_path=FILE.jsonl .* eval.tasks.arc_easy.few_shot=0"):
        load_builtin("arc_easy", path=str(fixture_path("arc_easy")), few_shot=2)  # never the rows being evaluated
    with pytest.raises(ValueError, match="only 6 available"):
        load_builtin("arc_easy", path=str(fixture_path("arc_easy")), few_shot=7, **fewshot_kw("arc_easy"))
    # the eval file as its own pool (lm-eval's fewshot_split == test_split): k+1 drawn, the item itself removed
    gsm = load_task("gsm8k", path=str(fixture_path("gsm8k")), n=3, **fewshot_kw("gsm8k"))
    assert gsm.meta["few_shot"] == 5 and len(gsm.rows) == 3
    assert gsm.rows[0]["prompt"].count("Question: ") == 6 and gsm.rows[0]["prompt"].count("#### ") == 5
    for r in gsm.rows:
        assert f"gsm8k/fewshot/{r['id'].split('/')[1]}" not in gsm.meta["fewshot_ids"][r["id"]]


def test_a_suite_task_from_a_local_file_at_k_shot_without_a_fewshot_file_is_refused_when_checked():
    from ftlab.cli.run import check
    from ftlab.config.registry import ConfigError

    paths = [f"eval.paths.{n}={fixture_path(n)}" for n in ("gsm8k", "hellaswag", "arc_challenge", "winogrande")]
    with pytest.raises(ConfigError, match=r"^eval.paths.gsm8k: with a local eval file, 5-shot .* "
                                          r"eval.tasks.gsm8k.fewshot_path=FILE.jsonl .* eval.tasks.gsm8k.few_shot=0$"):
        check(["eval=biderman", *paths])
    with pytest.raises(ConfigError, match="eval.tasks.arc_challenge.fewshot_path"):
        check(["eval=biderman", *paths, f"eval.tasks.gsm8k.fewshot_path={fewshot_path('gsm8k')}",
               "eval.tasks.arc_challenge.few_shot=2"])
    check(["eval=biderman", *paths, "eval.tasks.gsm8k.few_shot=0"])
    check([f"eval.paths.gsm8k={fixture_path('gsm8k')}"])  # not evaluated (eval=synth): nothing to refuse


def test_mmlu_limit_per_subject_and_first_n_examples_of_the_subject():
    rows, meta = load_builtin("mmlu", path=str(fixture_path("mmlu")), subset=["anatomy", "virology"])
    assert len(rows) == 4 and meta["subset"] == ["anatomy", "virology"]
    rows, _ = load_builtin("mmlu", path=str(fixture_path("mmlu")), n=2)  # lm-eval's --limit: per subject
    assert [r["id"] for r in rows] == ["mmlu/0", "mmlu/1", "mmlu/3", "mmlu/4", "mmlu/6"]
    rows, meta = load_builtin("mmlu", path=str(fixture_path("mmlu")), few_shot=2, **fewshot_kw("mmlu"))
    assert meta["fewshot_sampler"] == "first_n" and meta["fewshot_seed"] is None
    anatomy = rows[3]["context"]
    assert anatomy.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert anatomy.count("(dev)") == 2 and "abstract" not in anatomy.split("\n\n", 1)[1]
    assert anatomy.index("hyoid bone? (dev)") < anatomy.index("trigeminal nerve contain somatic motor processes? (dev)")
    assert meta["fewshot_ids"]["mmlu/3"] == meta["fewshot_ids"]["mmlu/5"] == ["mmlu/fewshot/2", "mmlu/fewshot/3"]
    with pytest.raises(ValueError, match="only 2 available for 'abstract_algebra'"):
        load_builtin("mmlu", path=str(fixture_path("mmlu")), few_shot=3, **fewshot_kw("mmlu"))
    with pytest.raises(ValueError, match="no rows for"):
        load_builtin("mmlu", path=str(fixture_path("mmlu")), subset=["astronomy"])


def test_boolq_reads_super_glue_by_default_and_google_boolq_when_asked(tmp_path):
    assert (BUILTINS.get("boolq").hf_path, BUILTINS.get("boolq").hf_name) == ("aps/super_glue", "boolq")
    from ftlab.eval.builtin import _hub_location

    assert _hub_location(BUILTINS.get("boolq"), None, None) == ("aps/super_glue", "boolq")
    assert _hub_location(BUILTINS.get("boolq"), "google/boolq", None) == ("google/boolq", None)
    sg = load_task("boolq", path=str(fixture_path("boolq"))).rows
    assert sg[0]["context"].startswith("Persian language -- Persian")  # the title is part of super_glue's passage
    google = tmp_path / "google_boolq.jsonl"  # google/boolq's fields: answer true/false, no title
    google.write_text("".join(json.dumps({"question": json.loads(x)["question"], "answer": bool(json.loads(x)["label"]),
                                          "passage": json.loads(x)["passage"].split(" -- ", 1)[1]}) + "\n"
                              for x in fixture_path("boolq").read_text().splitlines()))
    og = load_task("boolq", path=str(google)).rows
    assert [r["label"] for r in og] == [r["label"] for r in sg] and og[0]["context"].startswith("Persian (/")


def test_offline_hub_failure_names_the_local_file_override(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from ftlab.models.hub import HubUnavailable

    with pytest.raises((HubUnavailable, Exception), match="eval.paths.boolq=FILE.jsonl"):
        load_builtin("boolq")


# ------------------------------------------------------------------------------------- multiple choice
def reference_loglikelihoods(model, tok, task):
    """Straightforward per-choice scoring: one unpadded forward of context+continuation per choice."""
    out = []
    for pairs in mc.mc_requests(task, tok):
        lls = []
        for ctx, cont in pairs:
            if ctx != ctx.rstrip():
                n = len(ctx) - len(ctx.rstrip())
                ctx, cont = ctx[:-n], ctx[-n:] + cont
            c = tok(ctx)["input_ids"]
            w = tok(ctx + cont)["input_ids"][len(c):]
            ids = torch.tensor([c + w])
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            lls.append(sum(float(logp[len(c) - 1 + i, t]) for i, t in enumerate(w)))
        out.append(lls)
    return out


def reference_accuracy(task, lls):
    acc = norm = 0
    for r, ll in zip(task.rows, lls):
        lens = [len(r["continuation"])] * len(ll) if "contexts" in r else [len(c) for c in r["choices"]]
        acc += max(range(len(ll)), key=lambda i: (ll[i], -i)) == r["label"]
        norm += max(range(len(ll)), key=lambda i: (ll[i] / lens[i], -i)) == r["label"]
    return 100.0 * acc / len(lls), 100.0 * norm / len(lls)


@pytest.mark.parametrize("name", MC_TASKS)
def test_multiple_choice_equals_per_choice_reference(model, tok, name, monkeypatch):
    task = load_task(name, path=str(fixture_path(name)), few_shot=1, **fewshot_kw(name))
    ref = reference_loglikelihoods(model, tok, task)
    ref_acc, ref_norm = reference_accuracy(task, ref)
    # shared context: right-padded unmasked context pass (budget large), or left-padded masked (budget 0)
    for share, budget in ((True, mc._LOGITS_BUDGET), (True, 0), (False, mc._LOGITS_BUDGET)):
        monkeypatch.setattr(mc, "_LOGITS_BUDGET", budget)
        for bs in (1, 3):
            preds = mc.predict_multiple_choice(model, tok, task, bs, share_context=share)
            for p, r in zip(preds, ref):
                assert p["loglikelihoods"] == pytest.approx(r, abs=2e-4)
            got = score_predictions(task, preds)
            assert got["metrics"] == {"acc": ref_acc, "acc_norm": ref_norm}, (share, budget, bs)


def test_multiple_choice_chat_format_and_truncation(model, tok):
    task = load_task("boolq", path=str(fixture_path("boolq")), format="chat")
    assert task.delimiter == "" and mc.mc_requests(task, tok)[0][0][0].startswith("user: ")
    ref = reference_loglikelihoods(model, tok, task)
    preds = mc.predict_multiple_choice(model, tok, task, 4)
    assert [p["loglikelihoods"] for p in preds] == [pytest.approx(r, abs=2e-4) for r in ref]
    # a window shorter than the context: contexts are cut from the left, both paths agree
    short = load_task("boolq", path=str(fixture_path("boolq")), max_length=12)
    a = mc.predict_multiple_choice(model, tok, short, 4, share_context=True)
    b = mc.predict_multiple_choice(model, tok, short, 4, share_context=False)
    assert [p["loglikelihoods"] for p in a] == [pytest.approx(p["loglikelihoods"], abs=2e-4) for p in b]


def test_multiple_choice_scoring_rules():
    task = Task("t", "forget", "multiple_choice",
                [{"id": "a", "context": "Q", "choices": ["x", "yyyy"], "label": 1},
                 {"id": "b", "context": "Q", "choices": ["x", "y"], "label": 0}], metric="acc_norm")
    # a: acc picks 0 (-2 > -3), acc_norm picks 1 (-3/4 > -2/1); b: a tie picks the first choice
    res = score_predictions(task, [{"id": "a", "loglikelihoods": [-2.0, -3.0]},
                                   {"id": "b", "loglikelihoods": [-1.0, -1.0]}])
    assert res["metrics"] == {"acc": 50.0, "acc_norm": 100.0} and res["score"] == 100.0
    assert [i["prediction"] for i in res["items"]] == [0, 0] and res["items"][0]["prediction_norm"] == 1
    by_text = score_predictions(task, [{"id": "a", "prediction": "yyyy"}, {"id": "b", "prediction": 1}])
    assert by_text["metrics"]["acc"] == 50.0
    with pytest.raises(ValueError, match="no prediction"):
        score_predictions(task, [{"id": "a", "loglikelihoods": [0, 1]}])
    with pytest.raises(ValueError, match="2 log-likelihoods for 2|3 log-likelihoods"):
        score_predictions(task, [{"id": "a", "loglikelihoods": [0, 1, 2]}, {"id": "b", "loglikelihoods": [0, 1]}])
    with pytest.raises(ValueError, match="not one of"):
        score_predictions(task, [{"id": "a", "prediction": "zzz"}, {"id": "b", "prediction": 0}])


def _lm_eval_tasks(tmp_path, names):
    """lm-evaluation-harness's own task definitions, re-pointed at the local fixtures."""
    import os
    import shutil

    import lm_eval

    src = Path(os.path.dirname(lm_eval.__file__)) / "tasks"
    files = {"arc_challenge": ("arc/arc_challenge.yaml", "test"), "arc_easy": ("arc/arc_easy.yaml", "test"),
             "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
             "winogrande": ("winogrande/default.yaml", "validation"),
             "boolq": ("super_glue/boolq/default.yaml", "validation")}
    for name in names:
        rel, split = files[name]
        d = tmp_path / name  # the task's directory as shipped (its includes and !function helpers), plus ours
        shutil.copytree(src / Path(rel).parent, d, ignore=shutil.ignore_patterns("__pycache__", "*.md"))
        (d / f"ftlab_{name}.yaml").write_text(
            f"include: {Path(rel).name}\ntask: ftlab_{name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {fixture_path(name)}\ntraining_split: null\n"
            f"validation_split: {split if split == 'validation' else 'null'}\n"
            f"test_split: {split if split == 'test' else 'null'}\n")
    return tmp_path


def test_lm_eval_task_kind_runs_the_in_memory_model(model, tok, tmp_path):
    """lm_eval:<task> through build_tasks and evaluate: lm-eval's acc_norm (the default where a task has it, as the
    built-in arc_easy) on the in-memory model, cached like any task, equal to ftlab's own scoring of the same task."""
    pytest.importorskip("lm_eval")
    from ftlab.cli.run import check

    inc = _lm_eval_tasks(tmp_path / "tasks", ["arc_easy"])
    (cfg,) = check(["eval.target=[data]", "eval.forget=[lm_eval:ftlab_arc_easy]", f"eval.lm_eval.include_path={inc}",
                    "eval.limit=3"])
    (task,) = [t for t in build_tasks(cfg) if t.role == "forget"]
    assert task.name == "lm_eval:ftlab_arc_easy" and task.kind == "lm_eval" and task.metric == "acc_norm"
    assert len(task.rows) == 3 and task.higher_is_better and task.meta["lm_eval_version"]
    cache = tmp_path / "cache"
    first = evaluate(model, tok, [task], 4, stage="base", run_dir=tmp_path, cache_dir=cache, fingerprint="f",
                     progress=False)[task.name]
    ours = score_predictions(load_task("arc_easy", path=str(fixture_path("arc_easy")), n=3),
                             mc.predict_multiple_choice(model, tok, load_task("arc_easy", path=str(
                                 fixture_path("arc_easy")), n=3), 4))
    assert first["score"] == pytest.approx(ours["metrics"]["acc_norm"]) and first["n"] == 3
    recs = [json.loads(x) for x in (tmp_path / "records" / "base" / f"{task.name}.jsonl").open()]
    assert score_predictions(task, recs)["score"] == first["score"]
    again = evaluate(model, tok, [task], 4, stage="base", run_dir=tmp_path, cache_dir=cache, fingerprint="f",
                     progress=False)[task.name]
    assert again["cached"] is True and again["score"] == first["score"]


# ------------------------------------------------------------------------------------ perplexity, generation
def test_perplexity_windows_predict_every_token_once(model, tok):
    task = load_task("wikitext_lines", path=str(fixture_path("wikitext_lines")))
    whole = predict_perplexity(model, tok, task, 2)
    for r, p in zip(task.rows, whole):  # one window: a plain forward
        ids = torch.tensor([tok(r["text"])["input_ids"]])
        with torch.no_grad():
            nll = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="sum")
        assert p["nll"] == pytest.approx(float(nll), rel=1e-4) and p["n_tokens"] == ids.shape[1] - 1
    windowed = predict_perplexity(model, tok, load_task("wikitext_lines", path=str(fixture_path("wikitext_lines")),
                                                           max_length=16), 3)
    assert [p["n_tokens"] for p in windowed] == [p["n_tokens"] for p in whole]
    assert all(math.isfinite(p["nll"]) and p["nll"] > 0 for p in windowed)
    res = score_predictions(task, whole)
    total = sum(p["nll"] for p in whole) / sum(p["n_tokens"] for p in whole)
    assert res["score"] == pytest.approx(math.exp(total)) and res["higher_is_better"] is False


ADVERSARIAL = [  # (prediction, scores against reference 27)
    (" Maya has 36 - 9 = 27 pencils left.\n#### 27", True),
    (" #### 27.00\n\nQuestion: what is 5 + 5?\nAnswer: 10", True),
    (" The answer is $27.", True),
    (" 27 pencils, then 28 more? no: 3rd try gives 1,027", False),
    (" I think 26.\n\nQuestion: Tom has 27 apples", False),
    ("", False),
]


def test_generation_scoring_reads_the_final_number():
    """robust_match, ftlab's lenient reading (lm-eval's strict/flexible: tests/test_eval_parity_gsm8k.py)."""
    task = load_task("gsm8k", path=str(fixture_path("gsm8k")), few_shot=0)
    ref_row = next(r for r in task.rows if r["reference"] == "27")
    for pred, ok in ADVERSARIAL:
        preds = [{"id": r["id"], "prediction": pred if r is ref_row else ""} for r in task.rows]
        res = score_predictions(task, preds)
        item = next(i for i in res["items"] if i["id"] == ref_row["id"])
        assert item["scores"]["robust_match"] == (100.0 if ok else 0.0), pred


# ----------------------------------------------------------------------------------------- evaluate, cache
def test_evaluate_records_and_scoring_saved_records_agree(model, tok, tmp_path):
    tasks = [load_task(n, "forget", path=str(fixture_path(n)), **({"few_shot": 0} if n == "gsm8k" else {}),
                       **({"max_new_tokens": 4} if n == "gsm8k" else {})) for n in BUILTINS]
    res = evaluate(model, tok, tasks, 4, stage="base", run_dir=tmp_path, progress=False)
    for t in tasks:
        recs = [json.loads(line) for line in (tmp_path / "records" / "base" / f"{t.name}.jsonl").open()]
        assert len(recs) == len(t.rows) == res[t.name]["n"]
        again = score_predictions(t, recs)
        assert again["score"] == res[t.name]["score"] and again["metrics"] == res[t.name]["metrics"]
        if t.kind not in ("perplexity", "loglikelihood_rolling"):  # corpus-level: no per-item score
            assert sum(r["score"] for r in recs) / len(recs) == pytest.approx(res[t.name]["score"])


def test_base_cache_hits_and_misses(model, tok, tmp_path):
    cache = tmp_path / "cache"

    def run(task, fp="fp-a", tokenizer=tok):
        return evaluate(model, tokenizer, [task], 4, stage="base", run_dir=tmp_path, cache_dir=cache,
                        fingerprint=fp, progress=False)[task.name]

    path = str(fixture_path("arc_easy"))
    first = run(load_task("arc_easy", path=path))
    assert first["cached"] is False
    hit = run(load_task("arc_easy", path=path))
    assert hit["cached"] is True and hit["score"] == first["score"] and hit["metrics"] == first["metrics"]
    assert run(load_task("arc_easy", path=path, n=3))["cached"] is False  # n
    assert run(load_task("arc_easy", path=path, few_shot=1, **fewshot_kw("arc_easy")))["cached"] is False  # few-shot
    other_pool = str(fewshot_path("arc_challenge"))  # same k, other examples drawn
    assert run(load_task("arc_easy", path=path, few_shot=1, fewshot_path=other_pool))["cached"] is False
    assert run(load_task("arc_easy", path=path, format="chat"))["cached"] is False  # format
    assert run(load_task("arc_easy", path=path, metric="acc"))["cached"] is False  # metric
    assert run(load_task("arc_easy", path=path), fp="fp-b")["cached"] is False  # model weights
    edited = tmp_path / "arc_easy.jsonl"  # the task file: one answer key changed
    lines = Path(path).read_text().splitlines()
    lines[0] = lines[0].replace('"answerKey": "A"', '"answerKey": "B"')
    edited.write_text("\n".join(lines) + "\n")
    assert run(load_task("arc_easy", path=str(edited)))["cached"] is False
    assert run(load_task("arc_easy", path=str(edited)))["cached"] is True
    # a damaged entry is recomputed, not trusted
    for f in cache.glob("*.json"):
        f.write_text("{not json")
    assert run(load_task("arc_easy", path=path))["cached"] is False


def test_base_cache_key_covers_how_the_model_computes(model, tok, tmp_path):
    """Precision, weight dtype, attention kernel, device type and evaluation batch size each miss the base cache
    (in bf16 these flipped 4/24 and 9/24 base answers, and a stale base was reused); an unchanged rerun hits."""
    from ftlab.eval.cache import compute_signature

    cache = tmp_path / "cache"
    task = lambda: load_task("arc_easy", path=str(fixture_path("arc_easy")))  # noqa: E731 - a fresh task each time
    base = compute_signature(model, precision="fp32", device="cpu", batch_size=4)
    assert base == {"precision": "fp32", "dtype": "torch.float32", "device": "cpu",
                    "attn": model.config._attn_implementation, "batch_size": 4}

    def run(batch_size=4, **change):
        compute = {**compute_signature(model, precision="fp32", device="cpu", batch_size=batch_size), **change}
        return evaluate(model, tok, [task()], batch_size, stage="base", run_dir=tmp_path, cache_dir=cache,
                        fingerprint="fp", compute=compute, progress=False)["arc_easy"]["cached"]

    assert run() is False and run() is True
    assert run(batch_size=2) is False
    assert run(precision="bf16") is False
    assert run(dtype="torch.bfloat16") is False
    assert run(attn="sdpa" if base["attn"] != "sdpa" else "eager") is False
    assert run(device="cuda") is False
    assert run() is True


# ------------------------------------------------------------------------------------------ score CLI
def test_score_cli_applies_the_task_metric(tmp_path, capsys):
    from ftlab.cli import main

    preds = tmp_path / "preds.jsonl"
    task = load_task("arc_easy", path=str(fixture_path("arc_easy")))
    preds.write_text("".join(json.dumps({"id": r["id"], "prediction": r["label"] if i < 3 else 0}) + "\n"
                             for i, r in enumerate(task.rows)))
    assert main(["score", "arc_easy", str(preds), "--path", str(fixture_path("arc_easy")), "--metric", "acc"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "arc_easy" and out["metric"] == "acc" and out["score"] == 75.0 and out["n"] == 4
    gen = tmp_path / "gsm.jsonl"
    t = load_task("gsm8k", path=str(fixture_path("gsm8k")), few_shot=0, n=2)
    gen.write_text("".join(json.dumps({"id": r["id"], "prediction": f"so #### {r['reference']}"}) + "\n"
                           for r in t.rows))
    assert main(["score", "gsm8k", str(gen), "--path", str(fixture_path("gsm8k")), "--few-shot", "0",
                 "-n", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == 100.0
    # a missing item is an error, with the ids to use
    gen.write_text(json.dumps({"id": t.rows[0]["id"], "prediction": "1"}) + "\n")
    assert main(["score", "gsm8k", str(gen), "--path", str(fixture_path("gsm8k")), "-n", "2"]) == 2
    assert "have no prediction" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- suites
def test_suites_build_their_tasks_from_local_files():
    from ftlab.cli.run import check

    paths = [f"eval.paths.{n}={fixture_path(n)}" for n in ("gsm8k", "hellaswag", "arc_challenge", "winogrande")]
    (cfg,) = check(["eval=biderman", "eval.limit=3", *paths, f"eval.tasks.gsm8k.fewshot_path={fewshot_path('gsm8k')}"])
    tasks = build_tasks(cfg)
    assert [(t.name, t.role, t.metric) for t in tasks] == [
        ("gsm8k", "target", "strict_match"), ("hellaswag", "forget", "acc_norm"),
        ("arc_challenge", "forget", "acc_norm"), ("winogrande", "forget", "acc")]
    assert all(len(t.rows) == 3 for t in tasks)
    assert tasks[0].meta["few_shot"] == 5 and tasks[0].max_new_tokens == 256
    (cfg,) = check(["eval=standard", "eval.limit=2", "eval.tasks.mmlu.subset=[anatomy]", "eval.tasks.mmlu.few_shot=2",
                    f"eval.tasks.mmlu.fewshot_path={EVAL_FIX / 'mmlu_dev.jsonl'}",
                    *[f"eval.paths.{n}={fixture_path(n)}" for n in
                      ("mmlu", "arc_challenge", "arc_easy", "hellaswag", "winogrande", "boolq", "wikitext")]])
    tasks = {t.name: t for t in build_tasks(cfg)}
    assert set(tasks) == {"synth_sub", "mmlu", "arc_challenge", "arc_easy", "hellaswag", "winogrande", "boolq",
                          "wikitext"}
    assert tasks["mmlu"].meta["few_shot"] == 2 and tasks["mmlu"].meta["subset"] == ["anatomy"]
    assert [r["id"] for r in tasks["mmlu"].rows] == ["mmlu/3", "mmlu/4"]
    assert len(tasks["wikitext"].rows) == 3  # the suite's own n (every page) wins over eval.limit
    assert all(len(t.rows) == 2 for n, t in tasks.items() if n != "wikitext")


@pytest.mark.parametrize("override, message", [
    ("eval.forget=[hellaswg]", "eval.forget: unknown task 'hellaswg'"),
    ("+eval.paths.hellaswg=x.jsonl", "eval.paths.hellaswg: unknown built-in task"),
    ("eval.paths.boolq=/no/such.jsonl", "eval.paths.boolq: file"),
    ("eval.tasks.boolq.metric=exact_match", "eval.tasks.boolq.metric: unknown value"),
    ("eval.tasks.gsm8k.metric=exact_match", "eval.tasks.gsm8k.metric: unknown value"),
    ("eval.tasks.arc_easy.subset=[x]", "eval.tasks.arc_easy.subset: only mmlu"),
    ("eval.tasks.gsm8k.few_shot=-1", "eval.tasks.gsm8k.few_shot: must be >= 0"),
])
def test_eval_config_refusals(override, message):
    from ftlab.cli.run import check
    from ftlab.config.registry import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check([override])


# ------------------------------------------------------------------------------------------------ probes
def test_in_training_probes_ppl_and_kl_to_base(model, tok):
    from ftlab.eval.probes import Probes

    texts = [r["text"] for r in load_task("wikitext", path=str(fixture_path("wikitext"))).rows]
    probes = Probes(tok, texts, max_length=24, batch_size=2)
    base = probes.capture_base(model)
    same = probes(model)
    assert same["probe_kl"] == pytest.approx(0.0, abs=1e-6) and same["probe_ppl"] == pytest.approx(base["probe_ppl"])
    other = tiny_model(tok, seed=1)
    got = probes(other)
    kl = n = nll = 0.0  # direct: full softmax of both models on the same truncated texts
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"][:24]])
        with torch.no_grad():
            p = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            q = other(input_ids=ids).logits[0, :-1].log_softmax(-1)
        kl += float((p.exp() * (p - q)).sum())
        nll -= float(q.gather(-1, ids[0, 1:, None]).sum())
        n += ids.shape[1] - 1
    assert got["probe_kl"] == pytest.approx(kl / n, rel=1e-4) and got["probe_kl"] > 0.01
    assert got["probe_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    coarse = Probes(tok, texts, max_length=24, batch_size=2, topk=8, full_vocab_max=10)  # top-8 + one bucket
    coarse.capture_base(model)
    assert 0 < coarse(other)["probe_kl"] <= got["probe_kl"] + 1e-3
    assert coarse(model)["probe_kl"] == pytest.approx(0.0, abs=1e-2)


# ------------------------------------------------------------------------------------------ end to end
def test_a_run_on_a_local_model_with_the_biderman_suite(model, tok, tmp_path, ftlab_cache):
    """`ftlab run` (runner, base cache, records, result.json) with built-in tasks from local files, no world."""
    from ftlab.cli.run import check
    from ftlab.pipeline import run_from_dir
    from ftlab.rundir.layout import prepare_run_dir

    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    paths = [f"eval.paths.{n}={fixture_path(n)}" for n in ("gsm8k", "hellaswag", "arc_challenge", "winogrande")]
    paths.append(f"eval.tasks.gsm8k.fewshot_path={fewshot_path('gsm8k')}")
    overrides = ["model=smollm2-135m", f"model.name_or_path={model_dir}", "model.dtype=float32",
                 "model.attn_implementation=eager", "model.max_length=96", "data=gsm8k",
                 f"data.path={fixture_path('gsm8k')}", "eval=biderman", "eval.limit=3", "eval.tasks.gsm8k.few_shot=1",
                 "eval.tasks.gsm8k.max_new_tokens=4", "method=lora", "train.max_steps=2", "train.batch_size=2",
                 "train.log_every=1", "hw.num_threads=1", *paths]
    results = []
    for name in ("a", "b"):
        (cfg,) = check(overrides)
        prepare_run_dir(tmp_path / name, cfg)
        results.append(run_from_dir(tmp_path / name, progress=False))
    first, second = results
    assert first["status"] == "completed", first.get("error")
    tasks = first["tasks"]
    assert list(tasks) == ["gsm8k", "hellaswag", "arc_challenge", "winogrande"]
    assert tasks["gsm8k"]["role"] == "target" and tasks["gsm8k"]["metric"] == "strict_match"
    assert tasks["hellaswag"]["metric"] == "acc_norm" and tasks["winogrande"]["metric"] == "acc"
    assert all(t["n"] == 3 and t["source"].startswith("file:") for t in tasks.values())
    assert tasks["gsm8k"]["few_shot"] == 1 and first["summary"]["forgetting"] is not None
    gsm = {"strict_match", "flexible_extract", "robust_match"}
    assert gsm <= set(tasks["gsm8k"]["metrics"]["base"]) and gsm <= set(tasks["gsm8k"]["metrics"]["tuned"])
    grecs = [json.loads(x) for x in (tmp_path / "a" / "records" / "tuned" / "gsm8k.jsonl").open()]
    assert all(set(r["extracted"]) == set(r["scores"]) == gsm and r["score"] == r["scores"]["strict_match"]
               for r in grecs)
    recs = [json.loads(x) for x in (tmp_path / "a" / "records" / "tuned" / "hellaswag.jsonl").open()]
    assert len(recs) == 3 and {"loglikelihoods", "acc", "acc_norm", "score"} <= set(recs[0])
    assert all(t["base_cached"] for t in second["tasks"].values())
    assert {k: t["base"] for k, t in second["tasks"].items()} == {k: t["base"] for k, t in tasks.items()}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_choices_score_like_one_choice_at_a_time(attn, monkeypatch):
    """The packed second pass (every choice of a context in one row on its cache, block-diagonal causal mask) gives
    each choice the log-likelihood of scoring it alone with its context (ftlab's unshared path), within 1e-5."""
    import random
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM


    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         attn_implementation=attn)).eval()
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=2)
    r = random.Random(0)
    requests = []
    for _ in range(7):  # contexts of different lengths (right padding), choices of 1..6 tokens
        ctx = [1] + [r.randrange(4, 50) for _ in range(r.randint(3, 20))]
        requests += [(ctx, [r.randrange(4, 50) for _ in range(r.randint(1, 6))]) for _ in range(4)]
    packed = []
    real = mc._packed_rest
    monkeypatch.setattr(mc, "_packed_rest", lambda *a, **k: packed.append(real(*a, **k)) or packed[-1])
    with torch.no_grad():
        shared = mc.mc_loglikelihoods(model, tok, requests, 4, 512, share_context=True)
        alone = mc.mc_loglikelihoods(model, tok, requests, 4, 512, share_context=False)
    assert packed and all(packed)  # the packed pass ran for every batch of contexts
    assert max(abs(a - b) for a, b in zip(shared, alone)) <= 1e-5


def test_generation_ends_at_the_tasks_stop_strings(model, tok):
    """GSM8K (built-in and data=gsm8k) ends a continuation at lm-eval's `until` strings; greedy_decode cuts each
    row at the first stop string it produced and nowhere else."""
    from pathlib import Path

    from ftlab.cli.run import check
    from ftlab.config.names import GSM8K_STOP
    from ftlab.models.generate import cut_at_stop, greedy_decode

    assert GSM8K_STOP == ("Question:", "</s>", "<|im_end|>")
    assert load_task("gsm8k", path=str(fixture_path("gsm8k")), few_shot=0).stop == GSM8K_STOP
    fixtures = Path(__file__).parent / "fixtures"
    (cfg,) = check(["data=gsm8k", f"data.path={fixtures / 'gsm8k_mini.jsonl'}", "model=qwen2.5-0.5b", "eval=target"])
    assert tuple(cfg.data.stop) == GSM8K_STOP
    assert cut_at_stop(" 7.\n#### 7\n\nQuestion: next </s>", GSM8K_STOP) == " 7.\n#### 7\n\n"
    assert cut_at_stop("no stop here", GSM8K_STOP) == "no stop here"
    prompts = ["the cat", "a dog ran", "x"]
    plain = greedy_decode(model, tok, prompts, 12, batch_size=2)
    row = next(t for t in plain if len(t) > 3)
    stop = row[2:4]
    cut = greedy_decode(model, tok, prompts, 12, batch_size=2, stop=[stop])
    assert cut == [t[:t.find(stop)] if stop in t else t for t in plain]


def test_a_generation_prompt_longer_than_the_window_is_cut_from_the_left_and_counted(model, tok):
    """A prompt that leaves no room for max_new_tokens in the window keeps its last tokens (lm-eval's left
    truncation) instead of running out of memory; the item records how many tokens were cut, the task how many
    prompts."""
    from ftlab.eval.generation import predict_generation, score_generation

    long = " ".join(["the cat sat on the mat"] * 20)
    t = Task("g", "target", "generation", [{"id": "a", "prompt": long, "reference": "x"},
                                          {"id": "b", "prompt": "a dog", "reference": "y"}],
             max_new_tokens=4, max_length=24)
    preds = predict_generation(model, tok, t, batch_size=2)
    n_long = len(tok(long)["input_ids"])
    assert preds[0]["prompt_tokens_cut"] == n_long - 20 and preds[1]["prompt_tokens_cut"] == 0
    metrics, items = score_generation(t, preds)
    assert metrics["prompts_truncated"] == 1 and items[0]["prompt_tokens_cut"] == n_long - 20
    assert "prompt_tokens_cut" not in items[1]
    with pytest.raises(ValueError, match="leaves no room"):
        predict_generation(model, tok, Task("h", "target", "generation", t.rows, max_new_tokens=24, max_length=24), 2)


def test_a_multiple_choice_context_longer_than_the_window_is_cut_and_counted(model, tok, tmp_path):
    """Multiple choice cuts a context from the left so it fits the window with its longest continuation (as
    lm-eval), and the record says so: context_tokens_cut per item, prompts_truncated per task."""
    t = load_task("arc_easy", path=str(fixture_path("arc_easy")))
    t.rows[0] = {**t.rows[0], "context": " ".join(["a long question about the cat"] * 30)}
    short = Task(t.name, "forget", "multiple_choice", t.rows, max_length=32, metric=t.metric, delimiter=t.delimiter)
    res = evaluate(model, tok, [short], 4, stage="base", run_dir=tmp_path, progress=False)["arc_easy"]
    assert res["metrics"]["prompts_truncated"] >= 1
    recs = [json.loads(x) for x in (tmp_path / "records" / "base" / "arc_easy.jsonl").read_text().splitlines()]
    assert recs[0]["context_tokens_cut"] > 0
    full = evaluate(model, tok, [t], 4, stage="base2", run_dir=tmp_path, progress=False)["arc_easy"]
    assert "prompts_truncated" not in full["metrics"]
