"""GSM8K scored as lm-evaluation-harness scores it (issue 12): its own gsm8k task, built from the YAML it ships and
pointed at a local file, applies its filters and exact_match to the same generations as ftlab; the strict-match and
flexible-extract scores, what each extracted and the aggregates must be equal. Generation stops and cuts as its HF
backend does, on the same tiny model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_eval import model, tok  # noqa: E402,F401 - model, tok: module-scoped fixtures

from ftlab.config.names import GSM8K_STOP
from ftlab.eval.scoring import score_predictions
from ftlab.eval.suites import load_task
from ftlab.models.generate import cut_at_stop, greedy_decode

QUESTION = "A shop has some apples and sells a few. How many are left?"
# (the gold answer field as the dataset writes it, what the model generated before any stop string was cut)
CASES = [
    ("So 3 * 24 = 72.\n#### 72", " She sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72"),
    ("#### 72", " 48 + 24 = 72\n#### 72.00"),                      # strict compares strings: 72.00 != 72
    ("#### 72", " The answer is 72."),                               # no ####; flexible drops the trailing '.'
    ("#### 72", " The answer is 72. Check: 72-24=48"),               # flexible takes the last number
    ("#### 72", " 24 + 48 = 72 apples"),                             # units after the number
    ("#### 1000", " It costs $1,000"),                               # $ and , are ignored by exact_match
    ("#### 1000", " #### 1,000"),
    ("#### 1000", " ####1000"),                                      # no space after ####: strict finds nothing
    ("#### 1000", " The answer is 1,000,000."),
    ("#### 1,000", " #### 1000"),                                    # the target's comma is ignored too
    ("#### -3", " It drops by 3 degrees, so -3 is the answer.\n#### -3"),
    ("#### -3", " The change is \u22123."),                          # a unicode minus is no '-' to lm-eval
    ("#### -3", " -3"),
    ("#### 2.5", " 5 / 2 = 2.5 hours\n#### 2.5"),
    ("#### 2.5", " #### 2.50"),
    ("#### 2.50", " #### 2.50"),                                     # lm-eval compares with the answer as written
    ("#### 18", " 7 + 11 = 18\n\nQuestion: Tom has 5 apples. How many?\nAnswer: 5\n#### 5"),  # cut at Question:
    ("#### 18", " #### 18 </s> #### 19"),
    ("#### 18", " #### 18, then 3 more"),                            # strict right, flexible (the last, 3) wrong
    ("#### 18", " #### 18<|im_end|>\n#### 19"),
    ("#### 18", " 18 dollars"),
    ("#### 18", " That is 18%."),
    ("#### 18", ""),
    ("#### 18", " no idea"),
    ("#### 0", " 0"),
    ("#### 27", " The answer is 27 apples.\n#### 27."),               # one trailing '.' is ignored
    ("#### 27", " #### $27"),                                        # strict needs a digit right after '#### '
    ("#### 27", " 27, 28, 29"),
    ("#### 27", " I think 26.\n\nQuestion: Tom has 27 apples"),
    ("#### 27", " #### 5 and then #### 27"),                         # strict takes the first ####
    ("#### 27", " ....."),
    ("#### 27", " #### 27\n#### 27"),
    ("#### 27", " x = 27\n"),
    ("#### 27", " \\boxed{27}"),
    ("#### 5", " 12 - 7 = 5\nSo the answer is 5 pencils (or 5.0).\n"),
]


def _lm_eval_gsm8k(tmp_path: Path, data: Path):
    """lm-eval's gsm8k task as shipped (its directory copied), with only the dataset location replaced."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    src = Path(os.path.dirname(lm_eval.__file__)) / "tasks" / "gsm8k"
    d = tmp_path / "gsm8k"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("__pycache__", "*.md"))
    (d / "ftlab_gsm8k.yaml").write_text(
        f"include: gsm8k.yaml\ntask: ftlab_gsm8k\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {data}\n    test: {data}\n")
    tm = TaskManager(include_path=str(d), include_defaults=False)
    return tm.load("ftlab_gsm8k")["tasks"]["ftlab_gsm8k"]


def test_strict_and_flexible_equal_lm_evals_own_gsm8k_filters_and_metric(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.models.utils import postprocess_generated_text

    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"{QUESTION} ({i})", "answer": a}) + "\n"
                            for i, (a, _) in enumerate(CASES)))
    theirs = _lm_eval_gsm8k(tmp_path, data)
    until = theirs.config.generation_kwargs["until"]
    assert tuple(until) == GSM8K_STOP  # ftlab's stop strings are lm-eval's
    theirs.build_all_requests(limit=None, rank=0, world_size=1)
    insts = sorted(theirs.instances, key=lambda i: i.doc_id)
    assert len(insts) == len(CASES)
    for inst, (_, raw) in zip(insts, CASES):
        inst.resps = [postprocess_generated_text(raw, list(until), None)]  # the HF backend's cut at `until`
    theirs.apply_filters()
    docs = list(theirs.eval_docs)
    per_item = {f: [theirs.process_results(docs[i.doc_id], [i.filtered_resps[f]])["exact_match"] for i in insts]
                for f in ("strict-match", "flexible-extract")}
    mean = theirs.aggregation()["exact_match"]

    task = load_task("gsm8k", path=str(data), few_shot=0)
    assert task.metric == "strict_match" and task.stop == GSM8K_STOP
    preds = [{"id": r["id"], "prediction": cut_at_stop(raw, task.stop)} for r, (_, raw) in zip(task.rows, CASES)]
    assert [p["prediction"] for p in preds] == [i.resps[0] for i in insts]
    ours = score_predictions(task, preds)
    for name, f in (("strict_match", "strict-match"), ("flexible_extract", "flexible-extract")):
        assert [i["scores"][name] for i in ours["items"]] == [100.0 * s for s in per_item[f]], name
        assert [i["extracted"][name] for i in ours["items"]] == [i.filtered_resps[f] for i in insts], name
        assert ours["metrics"][name] == pytest.approx(100.0 * mean(per_item[f]), abs=1e-9)
    assert ours["score"] == ours["metrics"]["strict_match"]

    # the fixture separates the three metrics (else equal aggregates would say little)
    strict, flex = per_item["strict-match"], per_item["flexible-extract"]
    robust = [i["scores"]["robust_match"] / 100 for i in ours["items"]]
    assert 0 < sum(strict) < sum(flex) < sum(robust) < len(CASES)
    assert any(s and not f for s, f in zip(strict, flex)) and any(f and not s for s, f in zip(strict, flex))


def test_a_saved_gsm8k_record_rescored_gives_the_same_numbers(tmp_path, capsys):
    """The per-item record keeps each metric's extracted answer and score; `ftlab score` on the records (what
    evaluate writes) gives the same metrics."""
    from ftlab.cli import main

    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"{QUESTION} ({i})", "answer": a}) + "\n"
                            for i, (a, _) in enumerate(CASES)))
    task = load_task("gsm8k", path=str(data), few_shot=0)
    res = score_predictions(task, [{"id": r["id"], "prediction": cut_at_stop(raw, task.stop)}
                                   for r, (_, raw) in zip(task.rows, CASES)])
    rec = res["items"][1]  # " 48 + 24 = 72\n#### 72.00"
    assert rec["extracted"] == {"strict_match": "72.00", "flexible_extract": "72.00", "robust_match": "72"}
    assert rec["scores"] == {"strict_match": 0.0, "flexible_extract": 0.0, "robust_match": 100.0}
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps(i) + "\n" for i in res["items"]))
    for metric in ("strict_match", "flexible_extract", "robust_match"):
        assert main(["score", "gsm8k", str(records), "--path", str(data), "--few-shot", "0", "--metric", metric]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["metric"] == metric and out["metrics"] == res["metrics"] and out["score"] == res["metrics"][metric]
    assert len(set(res["metrics"].values())) == 3




def test_generation_stops_and_cuts_as_lm_evals_hf_backend(model, tok, one_thread):
    """greedy_decode with stop strings gives lm-eval's generate_until text (HFLM, batch size 1, same model) and
    stops generating once a row has written one: a stop string the model writes is where both end."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    prompts = ["Question: the cat sat\nAnswer:", "a dog ran", "x"]
    plain = greedy_decode(model, tok, prompts, 16, batch_size=2)
    row = max(plain, key=len)
    stop = row[3:5]  # a string the model does write, part way through
    assert stop and stop in row
    stops = [*GSM8K_STOP, stop]
    ours = greedy_decode(model, tok, prompts, 16, batch_size=2, stop=stops)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    reqs = [Instance("generate_until", {}, (p, {"until": list(stops), "max_gen_toks": 16, "do_sample": False}), i)
            for i, p in enumerate(prompts)]
    theirs = lm.generate_until(reqs, disable_tqdm=True)
    assert ours == theirs
    assert ours[plain.index(row)] == row[:row.find(stop)]

    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        greedy_decode(model, tok, [prompts[plain.index(row)]], 16, stop=[stop])
    finally:
        hook.remove()
    ids = tok(row, add_special_tokens=False)["input_ids"]
    assert len(calls) < 16 and len(calls) <= len(ids)  # it stopped once the stop string was written
