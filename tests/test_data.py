"""ftlab.data.answers and ftlab.data.sources: answer extraction, local jsonl data, held-out split, hub failure speed.

No test touches the network (hub tests run offline, or against a closed network and skip where the hub is
reachable); the embedded world's synth path is tested with the world itself.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

import ftlab.models.hub as fm
from ftlab.config.schema import DataConfig
from ftlab.data.answers import extract_number, normalize_exact, score
from ftlab.data.sources import MissingFieldError, heldout_split, load_eval, load_train
from ftlab.models.hub import HubUnavailable, hub_status

FIXTURE = Path(__file__).parent / "fixtures" / "gsm8k_mini.jsonl"


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch, tmp_path):
    """Offline by default, empty HF caches, no proxies, and a fresh probe for every test."""
    import datasets.config as dc
    import huggingface_hub.constants as hh

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hh, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setattr(dc, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    fm._probe_cache.clear()
    yield
    fm._probe_cache.clear()


def gsm8k_cfg(**kw) -> DataConfig:
    base = dict(name="gsm8k", source="hf", hf_path="openai/gsm8k", hf_name="main", answer="number",
                max_new_tokens=256)
    base.update(kw)
    return DataConfig(**base)


def fixture_rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------- answers
EXTRACT_CASES = [
    ("#### 72", "72"),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("####72", "72"),                                        # no space after ####
    ("####    1,000", "1000"),                               # spaces and thousands comma
    ("#### 1,234,567.", "1234567"),                          # trailing period
    ("#### $18.00", "18"),                                   # currency and decimal zeros
    ("#### -3", "-3"),
    ("#### \u22123", "-3"),                                  # unicode minus
    ("#### 5\n\nQuestion: Tom has 7 apples and 9 pears.", "5"),  # text after ####
    ("#### 12 dollars, i.e. 1200 cents", "12"),              # first number after ####, units ignored
    ("The answer is $18.", "18"),
    ("So the final answer is: 2.50 meters", "2.5"),
    ("Answer: 7. Check: 3 + 4 = 7, and 10 - 3 = 7 too, 99", "7"),
    ("She pays 18 dollars in total", "18"),
    ("The discount is 18%.", "18"),
    ("He has 12 apples on the 3rd day.", "12"),              # ordinal inside a word is not a number
    ("Buy 2 items for the 21st birthday", "2"),
    ("The mp3 player costs 40", "40"),                       # number glued to letters
    ("5 + 3 = 8\n8 * 2 = 16", "16"),                         # last number
    ("5-3=2", "2"),                                          # a minus between numbers is not a sign
    ("It is 5.00", "5"),
    ("It is .5 of the cake", "0.5"),
    ("x = -0.0", "0"),
    ("She ate 3/4 of the pie", "3/4"),                       # fractions left as is
    ("It costs -$5 now", "-5"),
    ("007", "7"),
    (r"so the result is \boxed{42}.", "42"),
    (" 14 apples.\nQuestion: Sam has 3 dogs and 5 cats.\nAnswer: 8", "14"),  # stop at a new Question:
    ("Q: what?\nA: 9 cows\nQ: next one has 11", "9"),
    ("no number at all", None),
    ("", None),
    ("####", None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_score():
    assert score("number", " ... so she has 72 clips.\n#### 72", "#### 72") == 100.0
    assert score("number", "72.00", "72") == 100.0
    assert score("number", "1/2", "#### 0.5") == 100.0
    assert score("number", "#### 71", "#### 72") == 0.0
    assert score("number", "no idea", "72") == 0.0
    assert score("number", "72", "no number") == 0.0
    assert score("exact", "  cba \n", "cba") == 100.0
    assert score("exact", "c b a", "c  b\ta") == 100.0
    assert score("exact", "cab", "cba") == 0.0
    assert normalize_exact("  a \n\t b  ") == "a b"
    with pytest.raises(ValueError, match="exact, number"):
        score("fuzzy", "a", "a")


# ------------------------------------------------------------------------------------------------ local data
def test_gsm8k_jsonl_formatting():
    cfg = gsm8k_cfg(source="jsonl", path=str(FIXTURE))
    train, evals = load_train(cfg, seed=0), load_eval(cfg, limit=None, seed=0)
    raw = {r["question"]: r["answer"] for r in fixture_rows()}
    assert len(train) + len(evals) == len(raw)
    for row in train + evals:
        assert set(row) == {"id", "prompt", "response", "reference"}
        assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:")
        question = row["prompt"][len("Question: "):-len("\nAnswer:")]
        assert row["response"] == " " + raw[question]  # rationale and #### line kept
        assert row["reference"] == raw[question].rsplit("#### ", 1)[1]
    first = train[0]
    assert first["id"] == "gsm8k_mini:1"
    assert first["prompt"] == ("Question: Maya buys 3 packs of pencils. Each pack has 12 pencils. She gives 9 "
                               "pencils to her brother. How many pencils does Maya have left?\nAnswer:")
    assert first["response"].endswith("\n#### 27") and first["reference"] == "27"
    refs = {r["reference"] for r in train + evals}
    assert {"-7", "475", "660"} <= refs  # negative, "2,350"-style question, percentages


def test_heldout_split_is_disjoint_and_deterministic():
    cfg = gsm8k_cfg(source="jsonl", path=str(FIXTURE))
    n = len(fixture_rows())
    evals = load_eval(cfg, limit=None, seed=0)
    assert len(evals) == math.ceil(0.1 * n)
    for seed in (0, 1, 2):
        train = load_train(cfg, seed=seed)
        assert {r["id"] for r in train}.isdisjoint({r["id"] for r in evals})
        assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in evals})
        assert len(train) + len(evals) == n
        assert load_eval(cfg, limit=None, seed=seed) == evals  # the seed does not move the held-out rows
    assert load_eval(cfg, limit=1, seed=0) == evals[:1]


def test_heldout_split_groups_duplicate_prompts_and_ignores_order():
    prompts = [f"q{i}" for i in range(30)] + ["q3", "q3", "q17"]
    train, held = heldout_split(prompts)
    assert sorted(train + held) == list(range(len(prompts)))
    assert len(held) >= 4
    assert {prompts[i] for i in train}.isdisjoint({prompts[i] for i in held})
    _, held_rev = heldout_split(prompts[::-1])
    assert {prompts[::-1][i] for i in held_rev} == {prompts[i] for i in held}
    with pytest.raises(ValueError, match="data.eval_path"):
        heldout_split(["same", "same"])


def test_eval_path_and_n_train(tmp_path):
    rows = fixture_rows()
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    cfg = gsm8k_cfg(source="jsonl", path=str(FIXTURE), eval_path=str(test_file))
    assert len(load_train(cfg, seed=0)) == len(rows)  # nothing held out when eval_path is given
    evals = load_eval(cfg, limit=2, seed=0)
    assert [r["id"] for r in evals] == ["test:1", "test:2"] and evals[0]["reference"] == "27"

    sub = gsm8k_cfg(source="jsonl", path=str(FIXTURE), n_train=5)
    a, b, c = load_train(sub, seed=0), load_train(sub, seed=0), load_train(sub, seed=1)
    assert len(a) == 5 and a == b and [r["id"] for r in a] != [r["id"] for r in c]
    all_train = {r["id"] for r in load_train(gsm8k_cfg(source="jsonl", path=str(FIXTURE)), seed=0)}
    assert {r["id"] for r in a} <= all_train


def test_generic_format_exact(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"src": f"abc{i}", "tgt": f"cba{i}", "n": i}) + "\n" for i in range(20)))
    cfg = DataConfig(name="rev_local", source="jsonl", path=str(f), prompt_field="src", response_field="tgt")
    rows = load_train(cfg, seed=0) + load_eval(cfg, limit=None, seed=0)
    assert len(rows) == 20
    for r in rows:
        assert r["prompt"].startswith("abc") and r["response"] == r["reference"] == "cba" + r["prompt"][3:]


def test_missing_field_names_file_field_and_fields(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"question": "q1", "answer": "#### 1"}) + "\n"
                 + json.dumps({"problem": "q2", "solution": "#### 2"}) + "\n")
    cfg = gsm8k_cfg(source="jsonl", path=str(f), eval_path=str(f))
    with pytest.raises(MissingFieldError) as ei:
        load_train(cfg, seed=0)
    msg = str(ei.value)
    assert f"{f}:2" in msg and "'question'" in msg and "'problem', 'solution'" in msg
    assert "data.prompt_field" in msg
    assert isinstance(ei.value, KeyError) and isinstance(ei.value, ValueError)


def test_bad_json_and_missing_file(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:3 is not valid JSON"):
        load_train(gsm8k_cfg(source="jsonl", path=str(f)), seed=0)
    with pytest.raises(FileNotFoundError, match="data.path"):
        load_train(gsm8k_cfg(source="jsonl", path=str(tmp_path / "nope.jsonl")), seed=0)


def test_eval_reference_without_number_is_an_error(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "no number here"}) + "\n")
    cfg = gsm8k_cfg(source="jsonl", path=str(FIXTURE), eval_path=str(f))
    with pytest.raises(ValueError, match=r"t\.jsonl:1 has no reference"):
        load_eval(cfg, limit=None, seed=0)


def test_hub_source_local_dataset_dir(tmp_path):
    """The `hf` code path (load_dataset, splits, fields) on a local dataset directory: offline, no hub."""
    rows = fixture_rows()
    ds_dir = tmp_path / "gsm8k_local"
    ds_dir.mkdir()
    (ds_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (ds_dir / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    cfg = gsm8k_cfg(hf_path=str(ds_dir), hf_name=None)
    train, evals = load_train(cfg, seed=0), load_eval(cfg, limit=3, seed=0)
    assert len(train) == 10 and len(evals) == 3
    assert evals[0]["id"] == f"{ds_dir}:test:0" and evals[0]["reference"] == rows[10]["answer"].split("#### ")[1]

    # no eval split: the held-out rule applies to the train split
    (ds_dir / "test.jsonl").unlink()
    train, evals = load_train(cfg, seed=0), load_eval(cfg, limit=None, seed=0)
    assert len(train) == 9 and len(evals) == 1
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in evals})

    with pytest.raises(MissingFieldError, match=r"'problem'.*'question', 'answer'"):
        load_train(gsm8k_cfg(hf_path=str(ds_dir), hf_name=None, prompt_field="problem"), seed=0)


# ------------------------------------------------------------------------------------------------------ hub
def _assert_fast_hub_failure(cfg: DataConfig, loader):
    t0 = time.monotonic()
    with pytest.raises(HubUnavailable) as ei:
        loader(cfg)
    elapsed = time.monotonic() - t0
    msg = str(ei.value)
    assert "gsm8k" in msg and "data.path=FILE.jsonl" in msg
    assert elapsed < 5.0, f"took {elapsed:.1f} s"
    return msg


def test_hub_dataset_offline_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")  # only the datasets variable
    monkeypatch.setattr(fm, "_connect", lambda *a: pytest.fail("no probe when HF_DATASETS_OFFLINE=1"))
    msg = _assert_fast_hub_failure(gsm8k_cfg(), lambda c: load_train(c, seed=0))
    assert "openai/gsm8k" in msg and "offline mode" in msg
    _assert_fast_hub_failure(gsm8k_cfg(), lambda c: load_eval(c, limit=10, seed=0))


def test_hub_dataset_no_offline_variables_closed_network_fails_fast(monkeypatch):
    """NO OFFLINE VARIABLES: the real probe against the real endpoint, on a machine without network.

    Without the probe load_dataset retries for ~23 s. Skipped where the hub is reachable (it would download)."""
    import datasets.config as dc
    import huggingface_hub.constants as hh

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hh, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(dc, "HF_HUB_OFFLINE", False)
    if hub_status(datasets=True, use_cache=False)[0]:
        pytest.skip("the hub is reachable from here; this test covers a closed network")
    fm._probe_cache.clear()
    msg = _assert_fast_hub_failure(gsm8k_cfg(), lambda c: load_train(c, seed=0))
    assert "unreachable" in msg
