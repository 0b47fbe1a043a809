"""Bad input never becomes a wrong number (issue 11): a run's identity follows the content of its input files,
broken items, predictions and models fail with the culprit named (and are never cached), train/eval overlap is
measured and full overlap refused, and data.mix stays in a range that can be built."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from conftest import FAST

from ftlab.cli.run import check
from ftlab.config.registry import ConfigError
from ftlab.config.schema import to_container
from ftlab.rundir.identity import ResumeRefused, config_digest, run_name

FIX = Path(__file__).parent / "fixtures"
EVAL_FIX = FIX / "eval"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sub_rows(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    """Rows of the world's subtraction skill as a local file's records (fields prompt, response)."""
    from ftlab.world.skills import make_examples

    return [{"prompt": r["prompt"], "response": r["response"]} for r in make_examples("sub", split, n, seed)]


def file_data(path: Path, *extra: str) -> list[str]:
    """Overrides for a run of the small world on a local .jsonl file instead of the synth generator."""
    return [*FAST, "data.source=jsonl", "data.name=subfile", f"data.path={path}", "data.prompt_field=prompt",
            "data.response_field=response", *extra]


def name_of(overrides: list[str]) -> str:
    (c,) = check(overrides)
    return run_name(to_container(c))


# ------------------------------------------------------------------------------------------- data identity
@pytest.mark.parametrize("overrides", [[], ["method=full", "seed=3"], ["data=[synth_sub,synth_rot1]"]])
def test_run_names_without_input_files_are_unchanged(overrides):
    """Configs that read no local file keep the name they always had: method_data_seed_ + the config digest."""
    from ftlab.rundir.identity import input_digests

    (c,) = check(FAST + overrides)
    d = to_container(c)
    assert input_digests(d) == {}
    assert run_name(d).endswith("_" + config_digest(d)[:10])
    # keys added for issue 11 leave the digest of a config at their default as it was
    old = copy.deepcopy(d)
    for data in [old["data"], *old.get("stages", [])]:
        del data["allow_overlap"]
    assert config_digest(old) == config_digest(d)


@pytest.mark.parametrize("key", ["data.path", "data.eval_path", "data.mix_source", "eval.paths.boolq",
                                 "eval.tasks.mmlu.fewshot_path"])
def test_run_name_follows_the_content_of_every_input_file(tmp_path, key):
    train = write_jsonl(tmp_path / "train.jsonl", sub_rows(40))
    evalf = write_jsonl(tmp_path / "eval.jsonl", sub_rows(5, "test"))
    mix = write_jsonl(tmp_path / "mix.jsonl", [{"text": f"general {i}"} for i in range(5)])
    boolq = tmp_path / "boolq.jsonl"
    boolq.write_bytes((EVAL_FIX / "boolq.jsonl").read_bytes())
    dev = tmp_path / "mmlu_dev.jsonl"
    dev.write_bytes((EVAL_FIX / "mmlu_dev.jsonl").read_bytes())
    files = {"data.path": train, "data.eval_path": evalf, "data.mix_source": mix, "eval.paths.boolq": boolq,
             "eval.tasks.mmlu.fewshot_path": dev}
    overrides = file_data(train, f"data.eval_path={evalf}", "data.mix=0.2", f"data.mix_source={mix}",
                          f"eval.paths.boolq={boolq}", f"eval.tasks.mmlu.fewshot_path={dev}")
    before = name_of(overrides)
    f = files[key]
    original = f.read_bytes()
    f.write_bytes(original.replace(b"}\n", b", \"extra\": 1}\n", 1))
    changed = name_of(overrides)
    assert changed != before and changed.rsplit("_", 1)[0] == before.rsplit("_", 1)[0]
    f.write_bytes(original)
    assert name_of(overrides) == before  # the name follows the content, not the time of the edit


def test_a_changed_input_file_is_refused_for_completed_and_partial_runs(tmp_path, ftlab_cache):
    """A completed run whose data file changed is not returned as done, and a partial run does not resume on the
    changed file: both refused with the file named, nothing in the run directory touched."""
    from ftlab.pipeline import run_from_dir
    from ftlab.rundir.layout import completed_record, prepare_run_dir
    from ftlab.utils.files import sha256_file

    train = write_jsonl(tmp_path / "train.jsonl", sub_rows(120))
    (cfg,) = check(file_data(train, "train.max_steps=4", "train.save_every=2", "eval.limit=4",
                             "eval.forget=[synth_add]", "eval.probe_every=0", "eval.diagnostics=[]"))
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, cfg)
    result = run_from_dir(run_dir, progress=False)
    assert result["status"] == "completed"
    assert result["inputs"]["data.path"] == {"path": str(train.resolve()), "sha256": sha256_file(train)}
    assert result["inputs"]["data.rows"]["n"] == 108 and len(result["inputs"]["data.rows"]["sha256"]) == 64
    assert completed_record(run_dir)["run_id"] == run_dir.name

    rows = sub_rows(120)
    rows[0]["response"] = "999"
    write_jsonl(train, rows)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ResumeRefused, match=r"data\.path .*train\.jsonl.*new directory"):
        completed_record(run_dir)
    with pytest.raises(ResumeRefused, match=r"data\.path"):
        run_from_dir(run_dir, progress=False)
    assert {p: p.read_bytes() for p in before} == before

    # a partial run (killed: its record never completed) with a checkpoint taken on the old content
    rec = json.loads((run_dir / "result.json").read_text())
    rec["status"] = "running"
    (run_dir / "result.json").write_text(json.dumps(rec))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ResumeRefused, match=r"refusing to resume from step_000004.*data\.path .*train\.jsonl"):
        run_from_dir(run_dir, progress=False)
    assert {p: p.read_bytes() for p in before} == before


def test_hub_data_is_recorded_by_revision(tmp_path):
    from ftlab.rundir.identity import hub_inputs
    from ftlab.rundir.record import RunRecord

    (c,) = check(["data=gsm8k", "model=smollm2-135m", "eval=target"])
    d = to_container(c)
    assert hub_inputs(d) == {"data.hf_path": {"hub": "openai/gsm8k/main", "revision": "main", "pinned": False}}
    d["data"]["revision"] = "e53f048856ff4f594e959d75785d2c2d37b678ee"
    rec = RunRecord(tmp_path)
    rec.start("x", d, {})
    assert rec.data["inputs"]["data.hf_path"]["pinned"] is True
    rec.note_train_rows([{"prompt": "p", "response": "r", "reference": "r"}])
    assert rec.data["inputs"]["data.rows"]["n"] == 1


def test_base_cache_key_covers_the_fewshot_file(tmp_path):
    from ftlab.eval.cache import cache_key
    from ftlab.eval.suites import load_task

    dev = tmp_path / "dev.jsonl"
    dev.write_bytes((EVAL_FIX / "mmlu_dev.jsonl").read_bytes())
    kw = dict(path=str(EVAL_FIX / "mmlu.jsonl"), few_shot=1, fewshot_path=str(dev))
    a = load_task("mmlu", **kw)
    dev.write_bytes(dev.read_bytes() + b"\n")  # the same examples, another file
    b = load_task("mmlu", **kw)
    assert a.rows == b.rows and cache_key(a, "fp") != cache_key(b, "fp")
    assert len(b.meta["fewshot_sha256"]) == 64


# ------------------------------------------------------------------------- items validated when loaded
ARC = {"id": "x", "question": "Q?", "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]},
       "answerKey": "B"}
HS = {"activity_label": "A", "ctx_a": "x.", "ctx_b": "y", "endings": ["a", "b", "c", "d"], "label": "1"}
MMLU = {"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 1}
WG = {"sentence": "A then _ went.", "option1": "x", "option2": "y", "answer": "1"}
BQ = {"question": "q", "passage": "p", "answer": True}


def _with(base: dict, **changes) -> dict:
    out = copy.deepcopy(base)
    for k, v in changes.items():
        if v is _DROP:
            out.pop(k, None)
        else:
            out[k] = v
    return out


_DROP = object()

BAD_ITEMS = [  # (task, good record, bad record, field named in the message)
    ("arc_easy", ARC, _with(ARC, choices={"text": [], "label": []}), "choices"),
    ("arc_easy", ARC, _with(ARC, answerKey="Z"), "answerKey"),
    ("arc_easy", ARC, _with(ARC, choices={"text": ["a", "b", "c", "d"], "label": ["A", "B", "C"]}), "choices"),
    ("arc_easy", ARC, _with(ARC, choices=_DROP), "choices"),
    ("arc_challenge", ARC, _with(ARC, question=None), "question"),
    ("hellaswag", HS, _with(HS, label=_DROP), "label"),
    ("hellaswag", HS, _with(HS, label="7"), "label"),
    ("hellaswag", HS, _with(HS, label=-1), "label"),
    ("hellaswag", HS, _with(HS, label="5"), "label"),
    ("hellaswag", HS, _with(HS, endings=[]), "endings"),
    ("mmlu", MMLU, _with(MMLU, answer=7), "answer"),
    ("mmlu", MMLU, _with(MMLU, answer=-1), "answer"),
    ("mmlu", MMLU, _with(MMLU, answer="B"), "answer"),
    ("mmlu", MMLU, _with(MMLU, answer=True), "answer"),
    ("mmlu", MMLU, _with(MMLU, choices=[]), "choices"),
    ("winogrande", WG, _with(WG, sentence="no blank here"), "sentence"),
    ("winogrande", WG, _with(WG, answer="3"), "answer"),
    ("winogrande", WG, _with(WG, option2=_DROP), "option2"),
    ("boolq", BQ, _with(BQ, answer="maybe"), "answer"),
    ("boolq", BQ, _with(BQ, passage=_DROP), "passage"),
    ("wikitext", {"page": " = T = \n some text . \n"}, {"txt": "x"}, "page"),
    ("wikitext", {"page": " = T = \n some text . \n"}, {"text": " a line of Salesforce/wikitext \n"}, "page"),
    ("wikitext_lines", {"text": "some text"}, {"txt": "x"}, "text"),
    ("gsm8k", {"question": "q", "answer": "so #### 4"}, {"question": "q", "answer": "no number"}, "answer"),
    ("gsm8k", {"question": "q", "answer": "so #### 4"}, {"question": "q"}, "answer"),
]


@pytest.mark.parametrize("task, good, bad, field", BAD_ITEMS,
                         ids=[f"{t}-{i}" for i, (t, *_rest) in enumerate(BAD_ITEMS)])
def test_malformed_items_are_refused_with_file_line_and_field(tmp_path, task, good, bad, field):
    from ftlab.eval.suites import load_task

    f = write_jsonl(tmp_path / f"{task}.jsonl", [good, good, bad])
    with pytest.raises(ValueError) as e:
        load_task(task, path=str(f), few_shot=0)
    msg = str(e.value)
    assert f"{f}:3" in msg and repr(field) in msg and "\n" not in msg, msg


def test_a_hellaswag_file_without_labels_names_the_missing_field(tmp_path):
    from ftlab.eval.suites import load_task

    f = write_jsonl(tmp_path / "hs.jsonl", [_with(HS, label=_DROP)] * 3)
    with pytest.raises(ValueError, match=rf"{f}:1: .*'label'"):
        load_task("hellaswag", path=str(f))


def test_a_bad_fewshot_item_is_named_too(tmp_path):
    from ftlab.eval.suites import load_task

    dev = write_jsonl(tmp_path / "dev.jsonl", [MMLU, _with(MMLU, answer=9)])
    with pytest.raises(ValueError, match=rf"fewshot_path: {dev}:2: .*'answer'"):
        load_task("mmlu", path=str(EVAL_FIX / "mmlu.jsonl"), few_shot=1, fewshot_path=str(dev))


@pytest.mark.parametrize("row, what", [
    ({"id": "a", "context": "Q", "choices": [], "label": 0}, "choices"),
    ({"id": "a", "context": "Q", "choices": ["x", "y"], "label": 7}, "label"),
    ({"id": "a", "context": "Q", "choices": ["x", "y"], "label": -1}, "label"),
    ({"id": "a", "context": "Q", "choices": ["x", "y"], "label": "1"}, "label"),
    ({"id": "a", "contexts": ["x"], "continuation": "c", "label": 0}, "contexts"),
])
def test_scoring_refuses_items_that_cannot_be_scored(row, what):
    """Whatever built the task: an item with no choices never counts as correct, a label out of range or of the
    wrong type never scores 0 silently."""
    from ftlab.eval.scoring import score_predictions
    from ftlab.eval.task import Task

    task = Task("t", "forget", "multiple_choice", [row], metric="acc")
    n = len(row.get("choices", row.get("contexts")))
    with pytest.raises(ValueError, match=rf"task 't' item 'a': .*'{what}'"):
        score_predictions(task, [{"id": "a", "loglikelihoods": [-1.0] * n}])


# ------------------------------------------------------------------------------ broken models, never cached
@pytest.fixture(scope="module")
def nan_model():
    import torch
    from test_eval import make_tokenizer, tiny_model

    tok = make_tokenizer()
    model = tiny_model(tok)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    return model, tok


@pytest.mark.parametrize("name", ["mmlu", "wikitext", "wikitext_lines"])
def test_a_nan_model_fails_the_evaluation_and_nothing_is_cached(nan_model, tmp_path, name, one_thread):
    from test_eval import fixture_path

    from ftlab.eval.evaluate import evaluate
    from ftlab.eval.suites import load_task

    model, tok = nan_model
    task = load_task(name, "forget", path=str(fixture_path(name)), n=3)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=rf"task '{name}' item '{name}/\d+': .*nan"):
        evaluate(model, tok, [task], 4, stage="base", run_dir=tmp_path, cache_dir=cache, fingerprint="fp",
                 progress=False)
    assert not cache.exists() or not list(cache.glob("*.json"))


def test_a_cached_entry_with_non_finite_values_is_not_trusted(tmp_path):
    from ftlab.eval.cache import read_cached, write_cached
    from ftlab.eval.task import Task

    task = Task("t", "forget", "multiple_choice",
                [{"id": "a", "context": "Q", "choices": ["x", "y"], "label": 0}], metric="acc")
    preds = [{"id": "a", "loglikelihoods": [float("nan"), float("nan")]}]
    (tmp_path / "k.json").write_text(json.dumps({"predictions": preds, "signature": task.signature()}))
    assert read_cached(tmp_path, "k") is None  # a NaN cached by an older version: recomputed, not trusted
    with pytest.raises(ValueError, match="non-finite"):
        write_cached(tmp_path, "k2", task, preds)
    assert not (tmp_path / "k2.json").exists()


# ------------------------------------------------------------------------------------ ftlab score, per line
def _score(args, capsys):
    from ftlab.cli import main

    code = main(["score", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("task, line, field", [
    ("gsm8k", {"prediction": 27}, "prediction"),
    ("mmlu", {"loglikelihoods": [-1.0, None, -2.0, -3.0]}, "loglikelihoods"),
    ("mmlu", {"loglikelihoods": [-1.0, "NaN", -2.0, -3.0]}, "loglikelihoods"),
    ("mmlu", {"loglikelihoods": [-1.0, math.nan, -2.0, -3.0]}, "loglikelihoods"),
    ("mmlu", {"loglikelihoods": "-1,-2"}, "loglikelihoods"),
    ("mmlu", {}, "loglikelihoods"),
    ("wikitext", {"nll": -3.0, "n_tokens": 4}, "nll"),
    ("wikitext", {"nll": math.inf, "n_tokens": 4}, "nll"),
    ("wikitext", {"nll": 3.0, "n_tokens": -4}, "n_tokens"),
    ("wikitext", {"nll": 3.0, "n_tokens": "4"}, "n_tokens"),
    ("wikitext", {"nll": None, "n_tokens": 4}, "nll"),
    ("mmlu", "not an object", None),
    ("mmlu", [1, 2], None),
    ("mmlu", {"loglikelihoods": [-1.0, -2.0, -3.0, -4.0], "id": None}, "id"),
])
def test_score_validates_every_prediction_line(tmp_path, capsys, task, line, field):
    from test_eval import fixture_path

    from ftlab.eval.suites import load_task

    path = str(fixture_path(task))
    t = load_task(task, path=path, few_shot=0, n=3)
    good = {"gsm8k": {"prediction": "#### 1"}, "mmlu": {"loglikelihoods": [-1.0, -2.0, -3.0, -4.0]},
            "wikitext": {"nll": 3.0, "n_tokens": 4}}[task]
    lines = [json.dumps({"id": r["id"], **good}) for r in t.rows]
    lines[1] = json.dumps({"id": t.rows[1]["id"], **line} if isinstance(line, dict) else line)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("\n".join(lines) + "\n")
    code, err = _score([task, str(preds), "--path", path, "--few-shot", "0", "-n", "3"], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and f"{preds}:2" in err and "Traceback" not in err, err
    if field:
        assert repr(field) in err, err


def test_score_refuses_a_file_that_is_not_utf8_and_accepts_a_bom(tmp_path, capsys):
    from ftlab.eval.suites import load_task

    path = str(EVAL_FIX / "mmlu.jsonl")
    t = load_task("mmlu", path=path, few_shot=0, n=2)
    text = "".join(json.dumps({"id": r["id"], "loglikelihoods": [-1.0, -2.0, -3.0, -4.0]}) + "\n" for r in t.rows)
    preds = tmp_path / "preds.jsonl"
    preds.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert _score(["mmlu", str(preds), "--path", path, "--few-shot", "0", "-n", "2"], capsys)[0] == 0
    preds.write_bytes(text.encode()[:-3] + b"\xff\n")
    code, err = _score(["mmlu", str(preds), "--path", path, "--few-shot", "0", "-n", "2"], capsys)
    assert code == 2 and f"{preds}: not UTF-8" in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------------------- train/eval overlap
def test_the_same_file_for_training_and_eval_is_refused_unless_allowed(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sub_rows(40))
    copy_ = tmp_path / "copy.jsonl"
    copy_.write_bytes(train.read_bytes())
    for evalf in (train, copy_):
        with pytest.raises(ConfigError, match=r"data\.eval_path: .*same.*data\.allow_overlap=true"):
            check(file_data(train, f"data.eval_path={evalf}"))
    (c,) = check(file_data(train, f"data.eval_path={train}", "data.allow_overlap=true"))
    assert c.data.allow_overlap is True


def test_overlap_is_measured_per_target_task():
    from ftlab.eval.overlap import OverlapRefused, measure_overlap
    from ftlab.eval.task import Task

    train = [{"id": f"t{i}", "prompt": p, "response": "r"} for i, p in enumerate(["What is 2+2?", "Name  a colour"])]
    part = Task("d", "target", "generation", [{"id": "a", "prompt": "what is 2+2?", "reference": "4"},
                                              {"id": "b", "prompt": "Other", "reference": "x"}])
    forget = Task("f", "forget", "generation", [{"id": "c", "prompt": "name a colour", "reference": "x"}])
    # a built-in task's item after its few-shot block counts as its prompt
    shot = Task("g", "target", "generation",
                [{"id": "e", "prompt": "Q: 1\nA: 1\n\nName a colour", "reference": "x"}])
    out = measure_overlap(train, [part, forget, shot], allow=True)
    assert out == {"d": {"n": 2, "overlap": 1, "fraction": 0.5, "ids": ["a"]},
                   "g": {"n": 1, "overlap": 1, "fraction": 1.0, "ids": ["e"]}}
    full = Task("d", "target", "generation", [{"id": "a", "prompt": "What is 2+2?", "reference": "4"}])
    with pytest.raises(OverlapRefused, match=r"'d'.*every one of its 1 eval prompt.*data\.allow_overlap=true"):
        measure_overlap(train, [full], allow=False)
    assert measure_overlap(train, [full], allow=True)["d"]["overlap"] == 1


def test_full_overlap_fails_the_run_and_partial_overlap_is_recorded(tmp_path, ftlab_cache):
    from ftlab.pipeline import RunFailed, run_from_dir
    from ftlab.rundir.layout import prepare_run_dir

    train_rows = sub_rows(120)
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    leaked = write_jsonl(tmp_path / "leaked.jsonl", train_rows[:6])
    partial = write_jsonl(tmp_path / "partial.jsonl", train_rows[:2] + sub_rows(4, "test"))
    common = ["train.max_steps=2", "eval.limit=6", "eval.forget=[synth_add]", "eval.probe_every=0",
              "eval.diagnostics=[]"]
    (cfg,) = check(file_data(train, f"data.eval_path={leaked}", *common))
    prepare_run_dir(tmp_path / "leaked", cfg)
    with pytest.raises(RunFailed, match=r"overlap.*'subfile'.*every one of its 6 eval prompts.*allow_overlap"):
        run_from_dir(tmp_path / "leaked", progress=False)
    (cfg,) = check(file_data(train, f"data.eval_path={partial}", *common))
    prepare_run_dir(tmp_path / "partial", cfg)
    result = run_from_dir(tmp_path / "partial", progress=False)
    assert result["overlap"]["subfile"] == {"n": 6, "overlap": 2, "fraction": pytest.approx(1 / 3),
                                            "ids": result["overlap"]["subfile"]["ids"]}
    assert len(result["overlap"]["subfile"]["ids"]) == 2


# --------------------------------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("mix", ["0.9999999", "0.95"])
def test_a_mix_that_cannot_be_built_is_refused_at_compose_time(mix):
    with pytest.raises(ConfigError, match=r"data\.mix: .*general rows per task row.*at most 0\.9"):
        check(FAST + [f"data.mix={mix}"])
    (c,) = check(FAST + ["data.mix=0.9"])
    assert c.data.mix == 0.9
