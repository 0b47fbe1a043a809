"""WikiText as lm-evaluation-harness 0.4.13 measures it: its task YAML, re-pointed at the page fixture, against
ftlab's built-in `wikitext` on the same in-memory model; its detokenizer and window rule, piece by piece."""

import copy
import importlib.util
import math
import os
import random
import shutil
from pathlib import Path

import pytest
from test_eval import fixture_path, model, tok  # noqa: F401 - model, tok: module-scoped fixtures

from ftlab.eval import perplexity as ppl
from ftlab.eval import wikitext
from ftlab.eval.metrics import summarize
from ftlab.eval.scoring import score_predictions
from ftlab.eval.suites import load_task

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

WINDOW = 32  # tokens: every fixture page needs several windows, so the rolling rule is exercised




def _no_bos(tok):
    """The same tokenizer without its BOS post-processor: lm-eval then prefixes BOS once, not twice."""
    from tokenizers import processors

    t = copy.deepcopy(tok)
    t.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert t("a b")["input_ids"][0] != t.bos_token_id
    return t


def _lm_eval_wikitext(tmp_path: Path) -> Path:
    """lm-eval's own wikitext directory (its YAML and preprocess_wikitext.py), plus a task that reads the fixture."""
    import lm_eval

    d = tmp_path / "wikitext"
    shutil.copytree(Path(os.path.dirname(lm_eval.__file__)) / "tasks" / "wikitext", d,
                    ignore=shutil.ignore_patterns("__pycache__", "*.md"))
    (d / "ftlab_wikitext.yaml").write_text(
        "include: wikitext.yaml\ntask: ftlab_wikitext\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {fixture_path('wikitext')}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n")
    return tmp_path


def _lm_eval_preprocess():
    import lm_eval

    path = Path(os.path.dirname(lm_eval.__file__)) / "tasks" / "wikitext" / "preprocess_wikitext.py"
    spec = importlib.util.spec_from_file_location("lm_eval_preprocess_wikitext", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("bos", ["tokenizer adds BOS", "no BOS"])
def test_wikitext_equals_lm_eval_on_its_own_task_definition(model, tok, tmp_path, bos):
    """word_perplexity, byte_perplexity and bits_per_byte, and every page's log-likelihood, equal lm-eval's (HF
    backend, same model, max_length=WINDOW) within 1e-4 relative. With a tokenizer that adds BOS, lm-eval 0.4.13
    reads BOS twice (its prefix token, then tok_encode's own) and scores the second: ftlab does the same."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    t = tok if bos == "tokenizer adds BOS" else _no_bos(tok)
    tm = TaskManager(include_path=str(_lm_eval_wikitext(tmp_path)), include_defaults=False)
    res = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=t, batch_size=4, device="cpu",
                                             max_length=WINDOW),
                                  tasks=["ftlab_wikitext"], task_manager=tm, log_samples=True)
    theirs = res["results"]["ftlab_wikitext"]
    task = load_task("wikitext", path=str(fixture_path("wikitext")), max_length=WINDOW)
    ours = score_predictions(task, ppl.predict_rolling(model, t, task, 4))
    assert len(ours["items"]) == 3 and all(i["n_tokens"] > 2 * WINDOW for i in ours["items"])  # windows roll
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours["metrics"][m] == pytest.approx(theirs[f"{m},none"], rel=1e-4), m
    samples = sorted(res["samples"]["ftlab_wikitext"], key=lambda s: s["doc_id"])
    assert [i["nll"] for i in ours["items"]] == pytest.approx([-float(s["resps"][0][0]) for s in samples], rel=1e-4)
    # the double BOS is in both numbers: the first token scored is the tokenizer's own BOS
    first = t(task.rows[0]["text"])["input_ids"][0]
    assert (first == t.bos_token_id) == (bos == "tokenizer adds BOS")


def test_detokenizer_and_counts_equal_lm_eval_functions():
    """ftlab's detokenizer is lm-eval's wikitext_detokenizer, and the counts are its process_results', on the
    fixture pages and on text built to hit every rule (contractions, @-@ separators, brackets, quotes, degrees)."""
    pytest.importorskip("lm_eval")
    import json

    theirs = _lm_eval_preprocess()
    pages = [r["page"] for r in json.loads(fixture_path("wikitext").read_text())]
    pages.append(" = = = A = = = \n The players ' 2 @,@ 000 ( [ { \" N ' s \" } ] ) : 3 @.@ 5 ° C ; it 's ! ? , "
                 "/' 7/ = = = = B = = = = \n ")
    rng = random.Random(0)
    pieces = [" ", "s '", " @-@ ", " @,@ ", " @.@ ", " : ", " ; ", " . ", " ! ", " ? ", " , ", "( ", " )", "[ ", " ]",
              "{ ", " }", "\" ", " \"", "' ", " '", "= = ", " ° ", " \n", "\n ", " N ", " 's", "word", "9"]
    pages += ["".join(rng.choice(pieces) for _ in range(40)) for _ in range(200)]
    for page in pages:
        assert wikitext.detokenize(page) == theirs.wikitext_detokenizer({"page": page}), page
        (ll, words), (_, nbytes), _ = theirs.process_results({"page": page}, [-1.0]).values()
        assert (wikitext.count_words(page), wikitext.count_bytes(page)) == (words, nbytes)
    rows = load_task("wikitext", path=str(fixture_path("wikitext"))).rows
    assert [r["text"] for r in rows] == [theirs.wikitext_detokenizer({"page": p}) for p in pages[:3]]
    assert any(r["n_bytes"] > len(p) for r, p in zip(rows, pages))  # bytes, not characters


def test_rolling_windows_are_lm_eval_windows():
    """Window by window, ftlab's (input, first scored position, targets) are what lm-eval's get_rolling_token_windows
    and make_disjoint_window give and HFLM._loglikelihood_tokens feeds the model."""
    pytest.importorskip("lm_eval")
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n, L in [(1, 4), (4, 4), (5, 4), (9, 4), (30, 7), (64, 32), (65, 32)]:
        tokens = list(range(100, 100 + n))
        want = []
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(tokens, 1, L, 1)):
            inp = (ctx + cont)[-(L + 1):][:-1]
            want.append((inp, len(inp) - len(cont), cont))
        got = ppl.rolling_windows(tokens, 1, L)
        assert got == want, (n, L)
        assert sum(len(t) for _, _, t in got) == n and all(len(i) <= L for i, _, _ in got)


def test_wikitext_records_recompute_the_metrics_and_a_line_file_is_refused(model, tok, tmp_path):
    """Per-item records hold nll, n_tokens, n_words and n_bytes; scoring them again (ftlab score) gives the same
    metrics; the task is lower-is-better, not in points, and a summary reports its change as forget_ppl_change_pct.
    A Salesforce/wikitext line file given to `wikitext` is refused, naming wikitext_lines."""
    from ftlab.cli import main

    task = load_task("wikitext", "forget", path=str(fixture_path("wikitext")), max_length=WINDOW)
    first = score_predictions(task, ppl.predict_rolling(model, tok, task, 2))
    assert set(first["items"][0]) == {"id", "nll", "n_tokens", "n_words", "n_bytes"}
    again = score_predictions(task, first["items"])
    assert again["metrics"] == first["metrics"] and again["metric"] == "word_perplexity"
    nll, words = sum(i["nll"] for i in first["items"]), sum(i["n_words"] for i in first["items"])
    assert first["score"] == pytest.approx(math.exp(nll / words))
    assert not task.higher_is_better and task.unit == "ppl"
    bpb = load_task("wikitext", path=str(fixture_path("wikitext")), metric="bits_per_byte")
    assert not bpb.higher_is_better and bpb.unit == "bits/byte"
    worse = summarize({"wikitext": {"role": "forget", "unit": task.unit, "higher_is_better": task.higher_is_better,
                                    "base": 100.0, "tuned": 110.0}})
    assert worse["forget_ppl_change_pct"] == pytest.approx(10.0) and worse["forgetting"] is None

    import json

    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": i["id"], "nll": i["nll"]}) + "\n" for i in first["items"]))
    out = tmp_path / "out.jsonl"
    assert main(["score", "wikitext", str(preds), "--path", str(fixture_path("wikitext")), "--items", str(out)]) == 0
    assert [json.loads(x)["n_words"] for x in out.read_text().splitlines()] == [i["n_words"] for i in first["items"]]

    with pytest.raises(ValueError, match=r"wikitext_lines.jsonl:1: .*'page'.*wikitext_lines"):
        load_task("wikitext", path=str(fixture_path("wikitext_lines")))
