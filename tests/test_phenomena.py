"""scripts/phenomena.py: the verdict rule and the statistics it rests on, on fabricated run directories."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ph():
    spec = importlib.util.spec_from_file_location("phenomena", ROOT / "scripts" / "phenomena.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["phenomena"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _run(root: Path, name: str, method: str, seed: int, summary: dict, curve=None, **cfg) -> Path:
    d = root / "runs" / name
    d.mkdir(parents=True)
    c = {"seed": seed, "method": {"name": method}, "model": {"name_or_path": "tiny", "world": {"size": "tiny"}},
         "data": {"skill": "sub", "mix": 0.0}, "reg": {"kind": "none"}, "stages": None, **cfg}
    (d / "config.yaml").write_text(yaml.safe_dump(c))
    (d / "result.json").write_text(json.dumps({"status": "completed", "summary": summary}))
    if curve:
        (d / "curve.jsonl").write_text("".join(json.dumps({"step": i * 10, "gain": g, "forgetting": f}) + "\n"
                                               for i, (g, f) in enumerate(curve)))
    return d


def test_verdict_rule(ph):
    pos = ph.fold([10.0, 11.0, 12.0])  # 11 +- 2.5: above 0
    neg = ph.fold([-10.0, -11.0, -12.0])
    zero = ph.fold([-1.0, 1.0, 0.5])
    assert ph.verdict([(pos, +1)]) == "reproduced" and ph.verdict([(neg, -1)]) == "reproduced"
    assert ph.verdict([(neg, +1)]) == "opposite" and ph.verdict([(zero, +1)]) == "no difference"
    assert ph.verdict([(pos, +1), (zero, +1)]) == "partly (1 of 2 as predicted, 1 hold 0)"
    assert ph.verdict([(ph.fold([1.0]), +1)]) == "not enough runs"  # one seed has no interval


def test_lora_vs_full_pairs_seeds_and_matches_gain(ph, tmp_path):
    # full gains 10 more than LoRA in every seed; at gain 40 (the highest multiple of 10 every curve reaches) LoRA's
    # forgetting is 5 higher: LoRA learns less (predicted) and forgets more (opposite)
    for s in range(3):
        _run(tmp_path, f"f{s}", "full", s, {"gain": 60.0 + s}, curve=[(0, 0), (40, 20 + s), (60 + s, 30)])
        _run(tmp_path, f"l{s}", "lora", s, {"gain": 50.0 + s}, curve=[(0, 0), (40, 25 + s), (50 + s, 40)])
    runs = ph.load(tmp_path)
    assert ph.matched_level(runs) == 50.0  # every curve reaches 50
    stats, _ = ph._lora_vs_full(runs)
    (_, gain, sg), (label, forg, sf) = stats
    assert gain["mean"] == pytest.approx(10.0) and gain["n"] == 3 and gain["lo"] == pytest.approx(10.0)
    assert "gain 50" in label and forg["mean"] > 0
    assert ph.verdict([(gain, sg), (forg, sf)]) == "partly (1 of 2 as predicted, 1 opposite)"


def test_a_second_run_of_one_seed_in_an_arm_is_refused(ph, tmp_path):
    # two configs (copies of one config are folded into one run, as ftlab report does)
    _run(tmp_path, "a", "full", 0, {"gain": 1.0}, train={"lr": 1e-4})
    _run(tmp_path, "b", "full", 0, {"gain": 2.0}, train={"lr": 3e-4})
    with pytest.raises(SystemExit, match="two runs of seed 0"):
        ph._by(ph.load(tmp_path), lambda r: ph._method(r) == "full")
