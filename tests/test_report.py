"""`ftlab report` on run directories built here (no training): discovery and status counts, duplicates, grouping
and seed folds, labels, the Pareto front, forgetting at matched gain, selection on validation only, the paired
bootstrap's coverage, the fairness listing and --strict, continual runs, and the CLI's md/csv/html/png output."""

from __future__ import annotations

import csv
import json
import math
import shutil
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from ftlab.cli import main
from ftlab.eval.metrics import summarize, task_entry
from ftlab.report import compare as C
from ftlab.report.render import Options, Refused, build, write
from ftlab.report.runs import ReportError, discover
from ftlab.report.stats import fold, forgetting_at_gain, paired_bootstrap, pareto_front, t_quantile
from ftlab.rundir.identity import run_name

TASKS = {"tgt": "target", "fa": "forget", "fb": "forget"}


def make_config(method="lora", seed=0, lr=1e-3, max_steps=100, limit=40) -> dict:
    cfg = {"seed": seed, "out_dir": "/somewhere", "model": {"name": "tiny", "name_or_path": "tiny", "prompt_format": "plain"},
           "data": {"name": "synth_sub", "source": "synth"},
           "method": {"name": method, **({"r": 8, "alpha": 8.0} if method == "lora" else {})},
           "train": {"max_steps": max_steps, "lr": lr, "batch_size": 8, "grad_accum": 1},
           "eval": {"name": "synth", "limit": limit}, "hw": {"name": "cpu"}, "logger": {"name": "console"},
           "reg": {"kind": "none"}, "stages": []}
    return cfg


def _scores(rng, p: float, n: int) -> list[float]:
    return [100.0 * x for x in (rng.random(n) < p)]


def write_run(root: Path, cfg: dict, probs: dict | None = None, status="completed", n=40, validation=None,
              curve=None, chance=None, ids_offset=0, name=None, continual=None, variants=None) -> Path:
    """A valid run directory: config.yaml, result.json whose task scores are the means of the per-item records
    written beside them (probs: task -> (p_base, p_tuned), per-item 0/100 draws seeded by the config's seed)."""
    d = root / (name or run_name(cfg))
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    if status == "pending":
        return d
    rng = np.random.default_rng(zlib.crc32(json.dumps([cfg["seed"], cfg["method"]["name"], cfg["train"]["lr"]]).encode()))
    probs = probs or {"tgt": (0.1, 0.6), "fa": (0.9, 0.7), "fb": (0.8, 0.8)}

    def section(split: str, pr: dict) -> dict:
        tasks = {}
        pre = "" if split == "test" else "validation_"
        for t, (pb, pt) in pr.items():
            base, tuned = _scores(rng, pb, n), _scores(rng, pt, n)
            ids = [f"{t}-{split}-{i + ids_offset}" for i in range(n)]
            for which, sc in (("base", base), ("tuned", tuned)):
                p = d / "records" / f"{pre}{which}" / f"{t}.jsonl"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("".join(json.dumps({"id": i, "score": s}) + "\n" for i, s in zip(ids, sc)))
            tasks[t] = task_entry(TASKS[t], "exact_match", True, "points", sum(base) / n, sum(tuned) / n, n)
            tasks[t].update(format="plain", few_shot=0)
            if chance is not None:
                tasks[t]["chance"] = chance
        return {"tasks": tasks, "summary": summarize(tasks)}

    test = section("test", probs)
    res = {"status": status, "error": None if status != "failed" else "boom", "method": cfg["method"]["name"],
           "seed": cfg["seed"], "finished_at": "2026-01-01", "train": {"steps": cfg["train"]["max_steps"]}, **test}
    if validation is not None:
        res["validation"] = section("validation", validation)
    if continual is not None:
        res["continual"] = continual
    if variants is not None:
        res["variants"] = variants
    (d / "result.json").write_text(json.dumps(res))
    if curve is not None:
        (d / "curve.jsonl").write_text("".join(json.dumps({"step": 10 * i, "tasks": {}, "gain": g, "forgetting": f,
                                                           "forgetting_max": f, "n": {}}) + "\n"
                                               for i, (g, f) in enumerate(curve)))
    return d


# ------------------------------------------------------------------------------------------------ pure stats
def test_t_quantile_and_seed_fold():
    # two-sided 95% critical values of Student's t (any statistics table)
    for df, q in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)):
        assert t_quantile(df) == pytest.approx(q, abs=1e-3)
    f = fold([1.0, 2.0, 6.0])
    sd = float(np.std([1, 2, 6], ddof=1))
    assert f["mean"] == pytest.approx(3.0) and f["std"] == pytest.approx(sd) and f["n"] == 3
    assert f["hi"] - f["mean"] == pytest.approx(4.303 * sd / math.sqrt(3), rel=1e-3)
    one = fold([5.0])
    assert one["mean"] == 5.0 and one["std"] is None and one["lo"] is None
    # a seed without a number is never averaged away
    assert fold([1.0, None])["mean"] is None and fold([1.0, None])["missing"] == 1


def test_pareto_front_on_a_constructed_case():
    pts = [("a", 10, 5), ("b", 20, 10), ("c", 15, 12),   # c: b has more gain and less forgetting
           ("d", 20, 10.5), ("e", 5, 1), ("f", 5, 2), ("g", None, 0)]
    assert sorted(pareto_front(pts)) == ["a", "b", "e"]


def test_forgetting_at_gain_interpolates_the_first_crossing():
    tr = [(0, 0), (10, 4), (30, 12), (20, 30), (50, 60)]
    assert forgetting_at_gain(tr, 20) == pytest.approx(8.0)   # halfway from (10,4) to (30,12)
    assert forgetting_at_gain(tr, 10) == pytest.approx(4.0)
    assert forgetting_at_gain(tr, 40) == pytest.approx(30 + (60 - 30) * (40 - 20) / 30)  # after the dip: from (20,30)
    assert forgetting_at_gain(tr, 0) == 0.0
    assert forgetting_at_gain(tr, 51) is None                  # never extrapolated
    assert forgetting_at_gain([(None, None), (5, 1), (15, 3)], 10) == pytest.approx(2.0)


def test_retention_above_chance():
    tasks = {"w": {"role": "forget", "unit": "points", "higher_is_better": True, "base": 60.0, "tuned": 52.0,
                   "chance": 50.0},
             "x": {"role": "forget", "unit": "points", "higher_is_better": True, "base": 60.0, "tuned": 52.0}}
    assert C.retention_above_chance(tasks) == pytest.approx(20.0)
    del tasks["w"]["chance"]
    assert C.retention_above_chance(tasks) is None


def test_paired_bootstrap_covers_the_true_difference():
    """Per-item 0/100 scores: item difficulty shared by both groups (the pairing), a shift per seed (a run that
    trained better or worse) and a fresh draw per seed and item. The true difference of the mean scores is
    100 x delta; over 200 independent data sets the 95% interval covers it in about 95% of them (binomial sd
    over 200 draws: 1.5 points). Resampling seeds and items naively counts the per-draw noise twice (~99.5%
    here): stats._decompose is what brings it to 95%."""
    rng = np.random.default_rng(1)
    n_items, seeds, delta, reps = 150, 4, 0.08, 200
    covered = 0
    for _ in range(reps):
        p = rng.uniform(0.2, 0.7, n_items)          # a new item population each time: items are random too
        shift_a, shift_b = rng.normal(0, 0.02, (seeds, 1)), rng.normal(0, 0.02, (seeds, 1))
        a = (rng.random((seeds, n_items)) < p + delta + shift_a) * 100.0
        b = (rng.random((seeds, n_items)) < p + shift_b) * 100.0
        r = paired_bootstrap([a], [b], n_boot=500, rng=rng)
        covered += r["lo"] <= 100 * delta <= r["hi"]
    assert 0.91 <= covered / reps <= 0.985, covered / reps
    assert r["items"] == n_items and r["seeds_a"] == seeds


# --------------------------------------------------------------------------------------- run directories
@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for m in ("full", "lora"):
        for s in (0, 1, 2):
            write_run(root / "runs", make_config(m, s),
                      {"tgt": (0.1, 0.8 if m == "full" else 0.5), "fa": (0.9, 0.5 if m == "full" else 0.8),
                       "fb": (0.8, 0.8)})
    return root


def test_discovery_counts_statuses_duplicates_and_compares_completed_only(sweep, tmp_path):
    runs = sweep / "runs"
    write_run(runs, make_config("ia3", 0), status="failed")
    write_run(runs, make_config("ia3", 1), status="running")
    write_run(runs, make_config("ia3", 2), status="preempted")
    write_run(runs, make_config("ia3", 3), status="pending")
    first = sorted(runs.iterdir())[0]
    shutil.copytree(first, tmp_path / "elsewhere" / "slurm" / "copy")   # the same run, synced twice
    (tmp_path / "elsewhere" / "multirun.yaml").write_text("hydra: {}\n")
    (tmp_path / "elsewhere" / "notes").mkdir()
    (tmp_path / "elsewhere" / "notes" / "config.yaml").write_text("foo: 1\n")  # not a run's config
    found = discover([str(sweep), str(tmp_path / "elsewhere")])
    assert found.counts == {"completed": 6, "running": 1, "failed": 1, "preempted": 1, "pending": 1}
    assert len(found.duplicates) == 1
    lines = []
    rep = build(Options(paths=[str(sweep), str(tmp_path / "elsewhere")], out=str(tmp_path / "o"), n_boot=200),
                log=lines.append)
    assert "6 completed, 1 running, 1 failed, 1 preempted, 1 pending" in lines[0] and "1 duplicate" in lines[0]
    assert [g.label for g in rep["compared"]] == ["method=full", "method=lora"]  # ia3 ran nothing: not compared
    for g in rep["compared"]:
        assert sorted(g.seeds) == [0, 1, 2]
        gains = [r.result["summary"]["gain"] for r in g.runs]
        assert g.stats["gain"]["mean"] == pytest.approx(np.mean(gains))
        assert g.stats["gain"]["std"] == pytest.approx(np.std(gains, ddof=1))
        assert g.stats["forgetting_max"]["mean"] == pytest.approx(np.mean([r.result["summary"]["forgetting_max"]
                                                                           for r in g.runs]))
    assert rep["fairness"] == []


def test_labels_name_only_the_keys_that_differ_and_over_folds_a_key(tmp_path):
    root = tmp_path / "r"
    for lr in (1e-3, 1e-2):
        write_run(root, make_config("lora", 0, lr=lr))
    write_run(root, make_config("full", 0, lr=1e-3))
    groups = C.make_groups(discover([str(root)]).completed)
    # method.r/alpha exist only for lora: they follow from the method and do not label
    assert sorted(g.label for g in groups) == ["method=full train.lr=0.001", "method=lora train.lr=0.001",
                                               "method=lora train.lr=0.01"]
    folded = C.make_groups(discover([str(root)]).completed, over=("train.lr",))
    assert sorted((g.label, len(g.runs)) for g in folded) == [("method=full", 1), ("method=lora", 2)]
    # a key added later with a null default does not split old runs from new ones; of keys that split the
    # groups the same way (max_steps and curve_every here) the label takes the first in LABEL_ORDER only
    root2 = tmp_path / "r2"
    write_run(root2, make_config("lora", 0))
    new = make_config("lora", 1)
    new["eval"]["added_later"] = None
    write_run(root2, new)
    other = make_config("lora", 0, max_steps=300)
    other["eval"]["curve_every"] = 10
    write_run(root2, other)
    groups = C.make_groups(discover([str(root2)]).completed)
    assert sorted((g.label, len(g.runs)) for g in groups) == [("train.max_steps=100", 2), ("train.max_steps=300", 1)]
    with pytest.raises(ReportError, match="--over train.lrr: no run"):
        build(Options(paths=[str(root)], over=("train.lrr",)), log=lambda *_: None)


def test_matched_gain_known_answer_and_not_reached(tmp_path):
    root = tmp_path / "r"
    # full: forgetting grows 1:1 with gain; lora: 0.5 per gain point; ia3 seed 1 stops at gain 20
    for s in (0, 1):
        write_run(root, make_config("full", s), curve=[(0, 0), (20, 20), (40, 40 + s)])
        write_run(root, make_config("lora", s), curve=[(0, 0), (10, 5), (30, 15 + s), (60, 30)])
        write_run(root, make_config("ia3", s), curve=[(0, 0), (25 if s == 0 else 20, 5)])
    groups = C.make_groups(discover([str(root)]).completed)
    mg = C.matched_gain(groups, [10, 20, 30])
    rows = {r["label"]: r["cells"] for r in mg["rows"]}
    assert rows["method=full"][0]["fold"]["mean"] == pytest.approx(10.0)
    assert rows["method=full"][2]["fold"]["mean"] == pytest.approx(30.25)  # (30 + 30.5) / 2
    assert rows["method=lora"][1]["fold"]["mean"] == pytest.approx((10 + 10.5) / 2)
    assert rows["method=ia3"][2]["fold"] is None and rows["method=ia3"][2]["reached"] == 0
    assert rows["method=ia3"][1]["fold"]["mean"] == pytest.approx((4 + 5) / 2)  # seed 0: 20/25 of the way to 5
    assert mg["ranks"][2] == {"method=lora": 1, "method=full": 2}           # ia3 not reached: not ranked
    # default levels: up to the highest gain every run reaches (ia3 seed 1: 20)
    assert C.default_levels(groups) == [5.0, 10.0, 15.0, 20.0]


def _variant(kind: str, alpha: float, gain: float, forgetting: float, beta: float | None = None) -> dict:
    params = {"alpha": alpha} if beta is None else {"alpha": alpha, "beta": beta}
    name = f"interp_a{alpha:g}" if kind == "interp" else f"lines_a{alpha:g}_b{beta:g}"
    return {"name": name, "kind": kind, "params": params, "gain": gain, "forgetting": forgetting,
            "summary": {"gain": gain, "forgetting": forgetting}, "tasks": {}, "records": f"records/variant_{name}"}


def _variant_sweep(root: Path) -> None:
    """full: interp at alphas 1 (listed first), -0.5 and 0.5 (alpha 0, the base, not evaluated) and LiNeS at two
    alphas; lora: interp 0.5 and 1, seed 1 also 0.25; no curve.jsonl anywhere."""
    for s in (0, 1):
        write_run(root, make_config("full", s), variants=[
            _variant("interp", 1.0, 40, 20 + 2 * s), _variant("interp", -0.5, 30, 1), _variant("interp", 0.5, 20, 4 + s),
            _variant("lines", 0.5, 30, 10 + s, beta=0.5), _variant("lines", 0.2, 10, 2, beta=0.8)])
        write_run(root, make_config("lora", s), variants=[_variant("interp", 0.5, 10, 1), _variant("interp", 1.0, 20, 6)]
                  + ([_variant("interp", 0.25, 5, 0.0)] if s else []))


def test_matched_gain_along_interpolation_known_answer(tmp_path):
    root = tmp_path / "r"
    _variant_sweep(root)
    groups = C.make_groups(discover([str(root)]).completed)
    full = next(g for g in groups if g.label == "method=full")
    # alpha 0 (the base) added at (0, 0); the negative alpha left out; sorted by alpha, not by listing order
    assert C.variant_trajectory(full.runs[0], "interp") == [(0.0, 0.0), (20.0, 4.0), (40.0, 20.0)]
    assert C.variant_trajectory(full.runs[0], "lines") == [(10.0, 2.0), (30.0, 10.0)]  # no base anchor for LiNeS
    assert C.matched_gain(groups, [10])["no_curves"] == ["method=full", "method=lora"]  # curve.jsonl untouched
    mg = C.matched_gain(groups, [10, 20, 30], traj=lambda r: C.variant_trajectory(r, "interp"))
    rows = {r["label"]: r["cells"] for r in mg["rows"]}
    assert rows["method=full"][0]["fold"]["mean"] == pytest.approx((2 + 2.5) / 2)   # half way base -> alpha 0.5
    assert rows["method=full"][2]["fold"]["mean"] == pytest.approx(((4 + 20) / 2 + (5 + 22) / 2) / 2)
    # lora seed 0: base -> (10, 1) gives 1; seed 1: base -> (5, 0) -> (10, 1) gives 1 as well
    assert rows["method=lora"][0]["fold"]["mean"] == pytest.approx(1.0)
    assert rows["method=lora"][1]["fold"]["mean"] == pytest.approx(6.0)
    assert rows["method=lora"][2]["fold"] is None and rows["method=lora"][2]["reached"] == 0  # never extrapolated
    assert mg["ranks"][0] == {"method=lora": 1, "method=full": 2}
    assert C.default_levels(groups, traj=lambda r: C.variant_trajectory(r, "interp")) == [5.0, 10.0, 15.0, 20.0]
    lines = C.matched_gain(groups, [20], traj=lambda r: C.variant_trajectory(r, "lines"))
    assert lines["no_curves"] == ["method=lora"]
    assert lines["rows"][0]["cells"][0]["fold"]["mean"] == pytest.approx((6 + 6.5) / 2)


def test_variants_table_folds_over_seeds(tmp_path):
    root = tmp_path / "r"
    _variant_sweep(root)
    groups = {g.label: g for g in C.make_groups(discover([str(root)]).completed)}
    full = {v["name"]: v for v in C.variants_table(groups["method=full"])}
    assert [v["name"] for v in C.variants_table(groups["method=full"])] == [
        "interp_a-0.5", "interp_a0.5", "interp_a1", "lines_a0.2_b0.8", "lines_a0.5_b0.5"]
    assert full["interp_a1"]["gain"]["mean"] == pytest.approx(40.0)
    assert full["interp_a1"]["forgetting"]["mean"] == pytest.approx(21.0)
    assert full["interp_a1"]["forgetting"]["std"] == pytest.approx(2 ** 0.5)
    assert full["lines_a0.5_b0.5"]["params"] == {"alpha": 0.5, "beta": 0.5}
    lora = {v["name"]: v for v in C.variants_table(groups["method=lora"])}
    # only seed 1 has alpha 0.25: no mean that hides the missing seed
    assert lora["interp_a0.25"]["gain"]["mean"] is None and lora["interp_a0.25"]["gain"]["missing"] == 1


def test_cli_report_with_variants_sections_and_images(tmp_path, capsys):
    root, out = tmp_path / "r", tmp_path / "out"
    _variant_sweep(root)
    assert main(["report", str(root), "--out", str(out), "--boot", "200", "--levels", "10,20"]) == 0
    md = (out / "report.md").read_text()
    for heading in ("Forgetting at matched gain along training", "Forgetting at matched gain along interpolation",
                    "Forgetting at matched gain along LiNeS", "Post-training variants"):
        assert f"## {heading}" in md
    assert "| method=full | interp_a0.5 | interp | alpha=0.5 | 2 | 20.0 ± 0.0 | 4.5 ± 0.7 |" in md
    assert "| method=lora | interp_a0.25 | interp | alpha=0.25 | 1 |" in md
    pngs = sorted(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    page = _Page()
    page.feed((out / "report.html").read_text())
    page.close()
    assert page.errors == [] and page.stack == []
    assert len(page.imgs) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in page.imgs)


def test_selection_reads_validation_only(tmp_path):
    def build_sweep(root: Path, test_good_lr: float) -> list:
        for m in ("full", "lora"):
            for lr in (1e-4, 1e-3, 1e-2):
                for s in (0, 1):
                    val = {"tgt": (0.1, 0.7 if lr == 1e-3 else 0.3), "fa": (0.9, 0.8), "fb": (0.8, 0.8)}
                    test = {"tgt": (0.1, 0.9 if lr == test_good_lr else 0.2), "fa": (0.9, 0.8), "fb": (0.8, 0.8)}
                    write_run(root, make_config(m, s, lr=lr), test, validation=val)
        groups = C.select(discover([str(root)]).completed, "train.lr")
        return sorted((g.label, g.chosen) for g in groups if g.selected)

    a = build_sweep(tmp_path / "a", test_good_lr=1e-2)
    b = build_sweep(tmp_path / "b", test_good_lr=1e-4)   # only the test scores differ
    assert a == b == [("method=full", "train.lr=0.001"), ("method=lora", "train.lr=0.001")]
    # the selected groups report TEST numbers (the test target of lr=1e-3 was drawn at p=0.2)
    rep = build(Options(paths=[str(tmp_path / "a")], select="train.lr", n_boot=200), log=lambda *_: None)
    assert all(g.stats["gain"]["mean"] < 30 for g in rep["compared"]) and len(rep["groups"]) == 6
    # ties on validation gain go to the lower validation forgetting
    root = tmp_path / "tie"
    for lr, fa in ((1e-3, 0.5), (1e-2, 1.0)):  # the same validation gain (0), forgetting 50 vs 0
        write_run(root, make_config("lora", 0, lr=lr), validation={"tgt": (0.0, 0.0), "fa": (1.0, fa)})
    assert [g.chosen for g in C.select(discover([str(root)]).completed, "train.lr") if g.selected] == \
        ["train.lr=0.01"]
    write_run(tmp_path / "noval", make_config("lora", 0))
    with pytest.raises(ReportError, match="no validation scores.*eval.validation=true"):
        C.select(discover([str(tmp_path / "noval")]).completed, "train.lr")


def test_paired_differences_from_records(sweep):
    groups = C.make_groups(discover([str(sweep)]).completed)
    full, lora = groups
    p = C.paired(lora, full, n_boot=300)
    # the point estimate is the mean per-item difference: equal to the difference of the recorded gains
    want = np.mean([r.result["summary"]["gain"] for r in lora.runs]) - \
        np.mean([r.result["summary"]["gain"] for r in full.runs])
    assert p["gain"]["diff"] == pytest.approx(want)
    assert p["gain"]["lo"] <= p["gain"]["diff"] <= p["gain"]["hi"]
    assert p["gain"]["items"] == 40 and p["forgetting"]["items"] == 80 and p["gain"]["seeds_a"] == 3
    # true differences: -30 points of gain, -15 of forgetting (lora forgets less)
    assert p["gain"]["significant"] and p["gain"]["hi"] < 0
    assert p["forgetting"]["diff"] < 0


def test_fairness_lists_differences_and_strict_refuses(tmp_path, capsys):
    root = tmp_path / "r"
    write_run(root, make_config("full", 0))
    write_run(root, make_config("lora", 0, max_steps=200), ids_offset=5)
    rep = build(Options(paths=[str(root)], n_boot=200), log=lambda *_: None)
    text = "\n".join(rep["fairness"])
    assert "step/token budget differs" in text and "800" in text and "1600" in text
    assert "item sets differs — items of tgt" in text
    pairs = next(s for s in rep["sections"] if s.heading.startswith("Paired"))
    assert pairs.rows[0][2] == "no paired records" and "Left out of some pairs" in pairs.text and "fb" in pairs.text
    md_rows = rep["sections"][0].rows
    assert len(md_rows) == len(rep["fairness"]) >= 4
    with pytest.raises(Refused):
        build(Options(paths=[str(root)], strict=True), log=lambda *_: None)
    assert main(["report", str(root), "--strict", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--strict" in err and "differ" in err
    assert not (tmp_path / "o" / "report.md").exists()


def test_continual_runs_r_matrix(tmp_path):
    root = tmp_path / "r"
    for s, x in ((0, 10.0), (1, 20.0)):
        cont = {"R": [[x, 0.0], [x / 2, 50.0]], "stages": ["s1", "s2"], "average_accuracy": (x / 2 + 50) / 2,
                "bwt": -x / 2, "forgetting_mean": x / 2, "fwt": 0.0}
        write_run(root, make_config("lora", s), continual=cont)
    g = C.make_groups(discover([str(root)]).completed)[0]
    ct = C.continual_table(g)
    assert ct["R"] == [[15.0, 0.0], [7.5, 50.0]] and ct["stages"] == ["s1", "s2"]
    assert ct["metrics"]["bwt"]["mean"] == pytest.approx(-7.5)
    rep = build(Options(paths=[str(root)], n_boot=200), log=lambda *_: None)
    sec = next(s for s in rep["sections"] if s.heading.startswith("Continual"))
    assert sec.rows == [["s1", "15.0", "0.0"], ["s2", "7.5", "50.0"]]
    assert len(sec.images) == 1 and sec.images[0][1][:4] == b"\x89PNG"


class _Page(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.imgs, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_cli_end_to_end_writes_md_csv_html_and_pngs(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(sweep), "--out", str(out), "--boot", "200"]) == 0
    printed = capsys.readouterr().out
    assert "6 completed" in printed and "method=lora" in printed
    md = (out / "report.md").read_text()
    for heading in ("Fairness", "Gain and forgetting", "Per task", "Forgetting at matched gain", "Paired differences"):
        assert f"## {heading}" in md
    assert "| method=lora | method=full |" in md  # lora vs the full reference, with its interval
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["group"] for r in rows] == ["method=full", "method=lora"] and rows[0]["n_seeds"] == "3"
    pngs = sorted(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    page = _Page()
    page.feed((out / "report.html").read_text())
    page.close()
    assert page.errors == [] and page.stack == []
    assert len(page.imgs) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in page.imgs)
    assert main(["report", str(tmp_path / "nothing-here")]) == 2


def test_wandb_logs_the_tables_and_plots_offline(sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    rep = write(Options(paths=[str(sweep)], out=str(out), wandb=True, n_boot=200), log=lambda *_: None)
    run_dir = Path(rep["wandb"])
    assert run_dir.is_dir() and list(run_dir.glob("*.wandb"))
    media = list(run_dir.rglob("*.png"))
    assert len(media) == len(list(out.glob("fig*.png")))


def test_update_profile_averages_seeds_per_layer(tmp_path):
    root = tmp_path / "r"
    for s, x in ((0, 0.1), (1, 0.3)):
        d = write_run(root, make_config("lora", s))
        (d / "diagnostics").mkdir()
        by_layer = {"0": {"rel_update": x}, "1": {"rel_update": 2 * x}, "None": {"rel_update": 9.0}}
        (d / "diagnostics" / "weights.json").write_text(json.dumps({"summary": {"by_layer": by_layer}}))
        res = json.loads((d / "result.json").read_text())
        res["diagnostics"] = {"files": {"weights": "diagnostics/weights.json"}}
        (d / "result.json").write_text(json.dumps(res))
    g = C.make_groups(discover([str(root)]).completed)[0]
    prof = C.update_profile(g)
    assert [k for k, _ in prof] == [0, 1] and prof[0][1] == pytest.approx(0.2) and prof[1][1] == pytest.approx(0.4)
    rep = build(Options(paths=[str(root)], n_boot=200), log=lambda *_: None)
    assert any(s.heading.startswith("Update profile") and s.images for s in rep["sections"])


def test_report_imports_neither_torch_nor_hydra():
    import subprocess
    import sys

    code = ("import sys, ftlab.cli.report, ftlab.report.render; "
            "print(sorted(m for m in ('torch', 'hydra', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


# ------------------------------------------------------------------------------------- forgetting by distance
def _set_distance(run_dir: Path, near, far) -> None:
    """Add a world run's forgetting_near / forgetting_far to a fixture result.json (None: leave the key out)."""
    p = run_dir / "result.json"
    res = json.loads(p.read_text())
    res["summary"].update({k: v for k, v in (("forgetting_near", near), ("forgetting_far", far)) if v is not None})
    p.write_text(json.dumps(res))


def test_forgetting_by_distance_folds_the_paired_difference_per_run(tmp_path, capsys):
    root = tmp_path / "sw"
    # near and far move together across seeds (a seed that forgets more forgets more of both), so the per-run
    # difference is nearly constant: its interval is far tighter than one built from the two separate means
    near = {"full": [20.0, 30.0, 40.0], "lora": [5.0, 9.0, 7.0]}
    far = {"full": [14.0, 25.0, 33.0], "lora": [5.5, 8.0, 7.5]}
    for m in ("full", "lora"):
        for s in (0, 1, 2):
            _set_distance(write_run(root / "runs", make_config(m, s)), near[m][s], far[m][s])
    rep = build(Options(paths=[str(root)], n_boot=200), log=lambda *_: None)
    by = {g.label: g.stats["distance"] for g in rep["compared"]}
    for m in ("full", "lora"):
        d = by[f"method={m}"]
        diffs = [a - b for a, b in zip(near[m], far[m])]
        assert d["forgetting_near"]["mean"] == pytest.approx(np.mean(near[m]))
        assert d["forgetting_far"]["mean"] == pytest.approx(np.mean(far[m]))
        sd = float(np.std(diffs, ddof=1))
        assert d["near_minus_far"]["mean"] == pytest.approx(np.mean(diffs))
        assert d["near_minus_far"]["hi"] - d["near_minus_far"]["mean"] == pytest.approx(4.303 * sd / math.sqrt(3),
                                                                                          rel=1e-3)
    full = by["method=full"]["near_minus_far"]
    assert full["lo"] > 0  # the paired interval excludes 0 ...
    assert by["method=full"]["forgetting_near"]["lo"] < by["method=full"]["forgetting_far"]["hi"]  # ... the means' overlap
    sec = next(s for s in rep["sections"] if s.heading.startswith("Forgetting by distance"))
    assert [r[0] for r in sec.rows] == ["method=full", "method=lora"]
    assert sec.rows[0][6] == f"{full['mean']:.1f} ± {full['std']:.1f}"

    out = tmp_path / "out"
    assert main(["report", str(root), "--out", str(out), "--boot", "200"]) == 0
    assert "Forgetting by distance" in capsys.readouterr().out  # the terminal shows it beside the main table
    md = (out / "report.md").read_text()
    assert "## Forgetting by distance to the target" in md and "| near - far |" in md
    assert "Forgetting by distance to the target" in (out / "report.html").read_text()
    rows = {r["group"]: r for r in csv.DictReader((out / "report.csv").open())}
    assert float(rows["method=lora"]["forgetting_near_mean"]) == pytest.approx(7.0)
    assert float(rows["method=full"]["near_minus_far_mean"]) == pytest.approx(np.mean([6.0, 5.0, 7.0]))


def test_forgetting_by_distance_missing_seed_other_runs_and_absence(tmp_path):
    root = tmp_path / "sw"
    for s in (0, 1, 2):  # seed 2 was written before the keys: no mean over the other two
        _set_distance(write_run(root / "runs", make_config("full", s)), *((10.0, 4.0) if s < 2 else (None, None)))
        write_run(root / "runs", make_config("lora", s))  # not a world run: no keys at all
    rep = build(Options(paths=[str(root)], n_boot=200), log=lambda *_: None)
    sec = next(s for s in rep["sections"] if s.heading.startswith("Forgetting by distance"))
    rows = {r[0]: r for r in sec.rows}
    assert rows["method=full"][2] == "missing in 1/3 seeds" and rows["method=full"][6] == "missing in 1/3 seeds"
    assert rows["method=lora"][2] == "not recorded"
    far_only = tmp_path / "far_only"  # a target with no close skill: far over every skill, near None
    for s in (0, 1):
        d = write_run(far_only / "runs", make_config("full", s))
        _set_distance(d, None, 3.0 + s)
        res = json.loads((d / "result.json").read_text())
        res["summary"]["forgetting_near"] = None
        (d / "result.json").write_text(json.dumps(res))
    rep = build(Options(paths=[str(far_only)], n_boot=200), log=lambda *_: None)
    (row,) = next(s for s in rep["sections"] if s.heading.startswith("Forgetting by distance")).rows
    assert row[2] == "no close skill" and row[4] == "3.5 ± 0.7" and row[6] == "—"
    plain = tmp_path / "plain"
    write_run(plain / "runs", make_config("full", 0))
    rep = build(Options(paths=[str(plain)], n_boot=200), log=lambda *_: None)
    assert not any(s.heading.startswith("Forgetting by distance") for s in rep["sections"])
    assert rep["compared"][0].stats["distance"] is None
