"""scripts/bench_train.py (issue 17) on its smallest config: the table's structure and that the two sides did the same
work. No timing is asserted: speed is judged in the benchmark's ratios, never in a test."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("bench_train", None)


def test_bench_train_smallest_config_table_and_same_work(bench_train, tmp_path, one_thread):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert bench_train.main(["--quick", "--steps", "2", "--warmup", "1", "--pairs", "1", "--json", str(out),
                             "--md", str(md)]) == 0
    report = json.loads(out.read_text())
    for key in ("date", "device", "torch", "transformers", "peft", "load", "load_start"):
        assert report["env"][key], key
    (row,) = report["rows"]
    assert (row["shape"], row["method"], row["pairs"], row["steps"]) == ("world", "lora", 1, 2)
    ftlab, hf = row["runs"]["ftlab"], row["runs"]["hf"]
    assert len(ftlab) == len(hf) == 1
    for a, b in zip(ftlab, hf):
        # the same non-pad tokens and padded positions reached each side's decoder, over the same steps
        assert a["steps"] == b["steps"] == 2
        assert a["tokens"] == b["tokens"] == row["tokens_per_side"] > 0
        assert a["padded_tokens"] == b["padded_tokens"] >= a["tokens"]
        assert a["timed_tokens"] == b["timed_tokens"] > 0
        # ftlab's own count (the loop's TrainResult) agrees with what the hook saw
        assert a["loop_tokens"] == a["tokens"]
        assert a["trainable"] == b["trainable"] == row["trainable"] > 0
    assert row["param_diff"] <= bench_train.DIFF_TOL["fp32"]
    assert row["speed_min"] <= row["speed_ratio"] <= row["speed_max"] and row["speed_ratio"] > 0
    text = md.read_text()
    assert "| shape | method |" in text and "speed ftlab/HF median (min..max)" in text
    assert text.count("| world | lora |") == 1
    assert report["env"]["device"] in text


def test_bench_train_refuses_a_ratio_when_the_sides_trained_different_tokens(bench_train, monkeypatch, one_thread):
    rows_of = bench_train._InOrder.__init__

    def fewer(self, encoded, batch, seed, steps):  # the HF side fed one row less per batch: less work
        rows_of(self, encoded, batch - 1, seed, steps)

    monkeypatch.setattr(bench_train._InOrder, "__init__", fewer)
    spec = bench_train.Spec(shape="world", method="lora", steps=2, warmup=1, batch=4, lr=1e-3, device="cpu",
                            precision="fp32", r=4, alpha=8.0, n_rows=32)
    with pytest.raises(SystemExit, match="different work"):
        bench_train.bench(spec, 1, {}, {}, log=lambda s: None)


def test_bench_kernels_calls_each_kernel_as_its_reference(one_thread):
    """scripts/bench_kernels.py times each kernel through an adapter to the reference's arguments; a wrong adapter
    (argument order, sum vs mean) would time a different computation. CPU: the kernels' own fallbacks run."""
    import torch

    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "scripts" / "bench_kernels.py")
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    for name, shape, ref in [("lora_linear", dict(M=33, K=24, N=40, r=4), bk.lora_reference),
                             ("fused_ce", dict(M=37, H=16, V=70), bk.ce_reference)]:
        kernel, where = bk.find_kernel(name)
        assert kernel is not None, where
        args, dy = bk.make_inputs(name, shape, "cpu", torch.float32)
        assert bk.max_rel_err(bk.outputs(kernel, args, dy), bk.outputs(ref, args, dy)) < 1e-5, name
