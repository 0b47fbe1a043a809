"""A corpus of bad inputs (issue 11): malformed data, eval and few-shot files, predictions, paths and overrides.

Each one must end with exit code 2 and one line `ftlab...` naming the culprit, no traceback, no run directory,
within 2 s (before any model loads), and leave an earlier completed run byte-identical. The CLI runs in this process
(ftlab.cli.main, stderr captured); a few cases go through a real subprocess too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMALL_WORLD
from test_bad_input import BAD_ITEMS, MMLU

from ftlab.cli import main

EVAL_FIX = Path(__file__).parent / "fixtures" / "eval"
FAST = [*SMALL_WORLD, "+debug=fast", "data.n_train=64"]
FILE_DATA = ["data.source=jsonl", "data.name=subfile", "data.prompt_field=prompt", "data.response_field=response"]
GOOD_ROWS = [{"prompt": f"{10 + i}-{i % 7}=", "response": str(10 + i - i % 7)} for i in range(20)]
SECONDS = 2.0


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# (name, file bytes) of a malformed data file; its fields are prompt/response
BAD_DATA_FILES = [
    ("empty", b""),
    ("blank_lines", b"\n\n  \n"),
    ("not_json_first", b"prompt: 1-1=\n"),
    ("not_json_third", jsonl(GOOD_ROWS[:2]) + b"{oops\n"),
    ("truncated", jsonl(GOOD_ROWS[:3])[:-10]),
    ("list_line", jsonl(GOOD_ROWS[:2]) + b"[1, 2]\n"),
    ("number_line", jsonl(GOOD_ROWS[:2]) + b"42\n"),
    ("string_line", jsonl(GOOD_ROWS[:2]) + b'"text"\n'),
    ("null_line", jsonl(GOOD_ROWS[:2]) + b"null\n"),
    ("missing_prompt", jsonl(GOOD_ROWS[:2] + [{"response": "1"}])),
    ("missing_response", jsonl(GOOD_ROWS[:2] + [{"prompt": "1-0="}])),
    ("null_prompt", jsonl(GOOD_ROWS[:2] + [{"prompt": None, "response": "1"}])),
    ("null_response", jsonl(GOOD_ROWS[:2] + [{"prompt": "1-0=", "response": None}])),
    ("wrong_fields", jsonl([{"question": "q", "answer": "a"}] * 3)),
    ("latin1", jsonl(GOOD_ROWS[:2]) + '{"prompt": "caf\u00e9", "response": "1"}\n'.encode("latin-1")),
    ("utf16", jsonl(GOOD_ROWS[:3]).decode().encode("utf-16")),
    ("binary", bytes(range(256)) * 4),
    ("nul_bytes", b"\x00" * 64),
    ("two_objects_one_line", b'{"prompt": "1-0=", "response": "1"} {"prompt": "2-0=", "response": "2"}\n'),
    ("trailing_comma", b'{"prompt": "1-0=", "response": "1",}\n'),
    ("single_quotes", b"{'prompt': '1-0=', 'response': '1'}\n"),
    ("nan_literal_line", jsonl(GOOD_ROWS[:2]) + b"NaN\n"),
    ("bom_then_garbage", b"\xef\xbb\xbfnot json\n"),
    ("lone_surrogate_bytes", jsonl(GOOD_ROWS[:2]) + b'{"prompt": "\xed\xa0\x80", "response": "1"}\n'),
]
BAD_JSON_LIST_FILES = [  # .json files holding a list
    ("list_invalid", b'[{"prompt": "1-0=", "response": "1"},'),
    ("list_of_numbers", b"[1, 2, 3]"),
    ("list_empty", b"[]"),
    ("list_missing_field", json.dumps([{"prompt": "1-0="}]).encode()),
]
BAD_MIX_FILES = [
    ("mix_missing_text", jsonl([{"body": "x"}] * 3)),
    ("mix_number_text", jsonl([{"text": 5}] * 3)),
    ("mix_list_text", jsonl([{"text": ["a"]}] * 3)),
    ("mix_not_json", b"plain text\n"),
    ("mix_latin1", '{"text": "na\u00efve"}\n'.encode("latin-1")),
    ("mix_empty", b""),
]
EVAL_TASKS = ["arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "mmlu", "wikitext", "gsm8k"]
BAD_EVAL_FILES = [  # file-level problems, for every built-in task's eval.paths entry
    ("ev_empty", b""),
    ("ev_not_json", b"{nope\n"),
    ("ev_latin1", '{"question": "\u00e9"}\n'.encode("latin-1")),
    ("ev_wrong_fields", jsonl([{"foo": 1}] * 2)),
]
BAD_PREDICTIONS = [  # (name, prediction lines for tests/fixtures/eval/mmlu.jsonl, n=2)
    ("pred_not_object", b"[1, 2]\n"),
    ("pred_not_json", b"{oops\n"),
    ("pred_nan", b'{"id": "mmlu/0", "loglikelihoods": [NaN, 0, 0, 0]}\n'),
    ("pred_null_ll", b'{"id": "mmlu/0", "loglikelihoods": [null, 0, 0, 0]}\n'),
    ("pred_short", b'{"id": "mmlu/0", "loglikelihoods": [0, 0]}\n'),
    ("pred_string_ll", b'{"id": "mmlu/0", "loglikelihoods": ["a", "b", "c", "d"]}\n'),
    ("pred_no_id", b'{"loglikelihoods": [0, 0, 0, 0]}\n'),
    ("pred_unknown_id", b'{"id": "mmlu/99", "loglikelihoods": [0, 0, 0, 0]}\n'),
    ("pred_latin1", '{"id": "mmlu/0", "prediction": "\u00e9"}\n'.encode("latin-1")),
    ("pred_inf", b'{"id": "mmlu/0", "loglikelihoods": [Infinity, 0, 0, 0]}\n'),
]
BAD_OVERRIDES = [  # (name, overrides, culprit named in the message)
    ("unknown_method", ["method=lorra"], "method"),
    ("negative_lr", ["train.lr=-1"], "train.lr"),
    ("mix_too_big", ["data.mix=0.9999999"], "data.mix"),
    ("mix_negative", ["data.mix=-0.1"], "data.mix"),
    ("long_name", ["data.name=" + "d" * 300], "data.name"),
    ("slash_name", ["data.name=a/b"], "data.name"),
    ("seed_text", ["seed=abc"], "seed"),
    ("unknown_key", ["train.lrr=1"], "train.lrr"),
    ("negative_limit", ["eval.limit=-3"], "eval.limit"),
    ("unknown_hw", ["hw=nope"], "hw"),
    ("unknown_data", ["data=nope"], "data"),
    ("zero_batch", ["train.batch_size=0"], "train.batch_size"),
    ("missing_data_path", ["data.source=jsonl"], "data.path"),
    ("missing_eval_file", ["eval.paths.mmlu=/nonexistent/mmlu.jsonl"], "eval.paths.mmlu"),
    ("missing_fewshot_file", ["eval.tasks.mmlu.fewshot_path=/nonexistent/dev.jsonl"], "fewshot_path"),
    ("missing_mix_file", ["data.mix=0.2", "data.mix_source=/nonexistent/mix.jsonl"], "data.mix_source"),
]


def corpus(root: Path, write: bool = True) -> list[dict]:
    """Every case: {id, argv (after `ftlab`), env (extra), culprit (a text the one line must hold)}; its files are
    written under `root` (with write=False only the cases are made, for their ids)."""

    def f(name: str, data: bytes, suffix: str = ".jsonl") -> Path:
        p = root / f"{name}{suffix}"
        if write:
            p.write_bytes(data)
        return p

    if write:
        root.mkdir(parents=True, exist_ok=True)
    good = f("good", jsonl(GOOD_ROWS))
    cases = []

    for name, data in BAD_DATA_FILES:
        p = f(name, data)
        cases.append({"id": f"data.path-{name}", "argv": ["run", *FAST, *FILE_DATA, f"data.path={p}"], "culprit": str(p)})
        q = f("eval_" + name, data)
        cases.append({"id": f"data.eval_path-{name}",
                      "argv": ["run", *FAST, *FILE_DATA, f"data.path={good}", f"data.eval_path={q}"], "culprit": str(q)})
    for name, data in BAD_JSON_LIST_FILES:
        p = f(name, data, ".json")
        cases.append({"id": f"data.path-{name}", "argv": ["run", *FAST, *FILE_DATA, f"data.path={p}"], "culprit": str(p)})
    for name, data in BAD_MIX_FILES:
        p = f(name, data)
        cases.append({"id": f"data.mix_source-{name}",
                      "argv": ["run", *FAST, "data.mix=0.2", f"data.mix_source={p}"], "culprit": str(p)})
    for task in EVAL_TASKS:
        for name, data in BAD_EVAL_FILES:
            p = f(f"{task}_{name}", data)
            cases.append({"id": f"eval.paths.{task}-{name}", "argv": ["run", *FAST, f"eval.paths.{task}={p}"],
                          "culprit": str(p)})
    for i, (task, good_rec, bad_rec, field) in enumerate(BAD_ITEMS):
        p = f(f"item_{i}_{task}", jsonl([good_rec, good_rec, bad_rec]))
        cases.append({"id": f"eval.paths.{task}-item{i}-{field}", "argv": ["run", *FAST, f"eval.paths.{task}={p}"],
                      "culprit": f"{p}:3"})
    for i, bad in enumerate([{**MMLU, "answer": 9}, {**MMLU, "choices": []}, {"question": "q"}]):
        p = f(f"fewshot_{i}", jsonl([MMLU, bad]))
        cases.append({"id": f"fewshot-{i}", "argv": ["run", *FAST, f"eval.tasks.mmlu.fewshot_path={p}"],
                      "culprit": f"{p}:2"})
    for name, data in BAD_PREDICTIONS:
        p = f(name, data)
        # ids that match no item: the items without a prediction are named, not a line
        cases.append({"id": f"score-{name}", "culprit": "no prediction" if name == "pred_unknown_id" else str(p),
                      "argv": ["score", "mmlu", str(p), "--path", str(EVAL_FIX / "mmlu.jsonl"), "-n", "2",
                               "--few-shot", "0"]})
    for name, overrides, culprit in BAD_OVERRIDES:
        cases.append({"id": f"override-{name}", "argv": ["run", *FAST, *overrides], "culprit": culprit})
    a_file = f("a_file", b"x")
    a_dir = root / "a_dir"
    if write:
        a_dir.mkdir(exist_ok=True)
    cases += [
        {"id": "path-outputs-is-a-file", "argv": ["run", *FAST], "env": {"FTLAB_OUTPUTS": str(a_file)},
         "culprit": str(a_file)},
        {"id": "path-outputs-under-a-file", "argv": ["run", *FAST], "env": {"FTLAB_OUTPUTS": f"{a_file}/out"},
         "culprit": str(a_file)},
        {"id": "path-cache-is-a-file", "argv": ["run", *FAST], "env": {"FTLAB_CACHE": str(a_file)},
         "culprit": str(a_file)},
        {"id": "path-cache-under-a-file", "argv": ["run", *FAST], "env": {"FTLAB_CACHE": f"{a_file}/c"},
         "culprit": str(a_file)},
        {"id": "path-outputs-read-only", "argv": ["run", *FAST], "env": {"FTLAB_OUTPUTS": "/sys/ftlab-out"},
         "culprit": "/sys"},
        {"id": "path-data-is-a-directory", "argv": ["run", *FAST, *FILE_DATA, f"data.path={a_dir}"],
         "culprit": "data.path"},
        {"id": "path-eval-is-a-directory", "argv": ["run", *FAST, f"eval.paths.mmlu={a_dir}"],
         "culprit": "eval.paths.mmlu"},
        {"id": "path-data-missing", "argv": ["run", *FAST, *FILE_DATA, f"data.path={root}/missing.jsonl"],
         "culprit": "missing.jsonl"},
        {"id": "path-same-train-and-eval", "argv": ["run", *FAST, *FILE_DATA, f"data.path={good}",
                                                    f"data.eval_path={good}"], "culprit": "data.eval_path"},
    ]
    return cases


CASE_IDS = [c["id"] for c in corpus(Path("corpus"), write=False)]
SUBPROCESS_IDS = ["data.path-latin1", "eval.paths.mmlu-ev_not_json", "override-long_name", "path-outputs-is-a-file",
                  "score-pred_nan"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, dict]:
    """The corpus, its files written once for the module."""
    return {c["id"]: c for c in corpus(tmp_path_factory.mktemp("bad_input_corpus"))}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, ftlab_cache):
    """One completed run in a shared FTLAB_OUTPUTS, and its files' bytes."""
    out = tmp_path_factory.mktemp("corpus_outputs")
    old = os.environ.get("FTLAB_OUTPUTS")
    os.environ["FTLAB_OUTPUTS"] = str(out)
    try:
        assert main(["run", *FAST]) == 0
    finally:
        if old is None:
            os.environ.pop("FTLAB_OUTPUTS", None)
        else:
            os.environ["FTLAB_OUTPUTS"] = old
    (run_dir,) = (out / "runs").iterdir()
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    return out, snapshot(out)


def test_the_corpus_is_big_enough(cases):
    assert len(CASE_IDS) >= 100 and len(set(CASE_IDS)) == len(CASE_IDS) == len(cases), len(CASE_IDS)
    assert set(SUBPROCESS_IDS) <= set(CASE_IDS)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_input_is_refused_cleanly(case_id, cases, earlier, capsys, monkeypatch):
    case, (out, _) = cases[case_id], earlier
    monkeypatch.setenv("FTLAB_OUTPUTS", str(out))
    for k, v in case.get("env", {}).items():
        monkeypatch.setenv(k, v)
    before = sorted(p.name for p in (out / "runs").iterdir())
    capsys.readouterr()
    t = time.monotonic()
    code = main(list(case["argv"]))
    took = time.monotonic() - t
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("ftlab"), err
    assert "Traceback" not in err
    assert case["culprit"] in lines[0], (case["culprit"], lines[0])
    assert sorted(p.name for p in (out / "runs").iterdir()) == before  # no run directory
    assert took < SECONDS, f"{took:.2f} s"


@pytest.mark.parametrize("case_id", SUBPROCESS_IDS)
def test_bad_input_in_a_real_process(case_id, cases, earlier):
    case, (out, _) = cases[case_id], earlier
    env = {**os.environ, "FTLAB_OUTPUTS": str(out), **case.get("env", {})}
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "ftlab", *case["argv"]], env=env, capture_output=True, text=True,
                       timeout=60)
    took = time.monotonic() - t
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and case["culprit"] in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert took < SECONDS + 1.5, f"{took:.2f} s (interpreter start included)"  # the process start, imports and refusal


def test_a_concurrent_run_of_the_same_config_is_refused_in_one_line(earlier, capsys, monkeypatch):
    """The lock is busy (another process runs this config): exit 2, one line naming the directory, no traceback,
    and the other run's directory is left as it was."""
    from ftlab.cli.run import check
    from ftlab.config.schema import to_container
    from ftlab.rundir.identity import run_name
    from ftlab.rundir.layout import locked, prepare_run_dir

    out, _ = earlier
    monkeypatch.setenv("FTLAB_OUTPUTS", str(out))
    args = [*FAST, "seed=7"]
    (cfg,) = check(args)
    run_dir = out / "runs" / run_name(to_container(cfg))
    prepare_run_dir(run_dir, cfg)
    files = snapshot(run_dir)
    capsys.readouterr()
    try:
        with locked(run_dir):  # what the other process holds while it runs
            code = main(["run", *args])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and "another process is running" in lines[0], err
        assert str(run_dir) in lines[0] and "Traceback" not in err
        # the run's own files untouched (Hydra's .hydra/ and empty run.log, and the lock file, aside)
        after = {k: v for k, v in snapshot(run_dir).items() if k not in (".lock", "run.log") and not k.startswith(".hydra/")}
        assert after == files
    finally:
        shutil.rmtree(run_dir)  # the earlier run's directory alone stays, for the byte check below


def test_good_files_pass_the_input_check_without_torch(tmp_path):
    """A UTF-8 BOM is accepted; reading and checking every input file imports no torch (config-time only)."""
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + jsonl(GOOD_ROWS))
    dev = tmp_path / "dev.jsonl"
    dev.write_bytes(b"\xef\xbb\xbf" + jsonl([MMLU] * 3))
    code = ("import sys; from ftlab.cli.run import check; "
            f"check({[*FAST, *FILE_DATA, f'data.path={bom}', f'eval.paths.mmlu={dev}']!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "FTLAB_OUTPUTS": str(tmp_path / "out")})
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
    assert not (tmp_path / "out").exists()


def test_earlier_results_are_byte_identical(earlier):
    out, files = earlier
    assert snapshot(out) == files
