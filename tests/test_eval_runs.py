"""Evaluation inside runs, on the small world: in-training probes (the forgetting curve and its exact resume),
diagnostics in result.json, and the continual protocol (data as a list of stages)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST
from ftlab.cli import check
from ftlab.runner import prepare_run_dir, run_from_dir

ONE = ["hw.num_threads=1"]
WALL = ("elapsed_s", "tokens_per_s", "probe_s")  # wall-clock fields: everything else must match exactly


def _run(root, name, overrides):
    (cfg,) = check(FAST + ONE + list(overrides))
    run_dir = root / name
    prepare_run_dir(run_dir, cfg)
    return run_dir, run_from_dir(run_dir, progress=False)


def curve(run_dir, drop=WALL):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def final_weights(run_dir):
    (f,) = (run_dir / "checkpoints" / "final").glob("*.safetensors")
    return load_file(str(f))


# ------------------------------------------------------------------------------------------------ probes
def test_probes_draw_a_forgetting_curve_without_changing_training(tmp_path, ftlab_cache):
    probed, with_probes = _run(tmp_path, "probed", ["method=full", "eval.probe_every=5"])
    plain, without = _run(tmp_path, "plain", ["method=full", "eval.probe_every=0"])
    rows = curve(probed)
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 20]
    assert rows[0]["loss"] is None and rows[0]["probe_kl"] == 0.0 and rows[0]["probe_ppl"] > 1
    assert all(r["loss"] is not None and r["probe_kl"] > 0 for r in rows[1:])
    # full fine-tuning on a new skill moves the model away from the base on held-out world text
    assert rows[-1]["probe_kl"] > 10 * rows[1]["probe_kl"] and rows[-1]["probe_ppl"] > rows[0]["probe_ppl"]
    assert not any("probe_kl" in r for r in curve(plain))
    # probes run in eval mode and draw no random numbers: the same weights and scores either way
    a, b = final_weights(probed), final_weights(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k: t["tuned"] for k, t in with_probes["tasks"].items()} == \
        {k: t["tuned"] for k, t in without["tasks"].items()}


def test_probe_curve_resumes_exactly_with_the_checkpointed_base_reference(tmp_path, ftlab_cache, monkeypatch):
    """Kill after step 5 (a copy cut back to its step-5 checkpoint), resume: the curve, probes included, is
    bit-identical. The resumed process's own capture of the base is perturbed: equality shows that the KL is
    computed against the reference saved in the checkpoint (probes.pt), not a rebuilt one."""
    ovr = ["method=lora", "method.dropout=0.1", "train.max_steps=9", "train.log_every=1", "train.save_every=1",
           "train.keep_checkpoints=100", "eval.probe_every=3", "eval.diagnostics=[]"]
    ref, _ = _run(tmp_path, "ref", ovr)
    assert (ref / "checkpoints" / "step_000005" / "probes.pt").is_file()
    run_dir = tmp_path / "resumed"
    shutil.copytree(ref, run_dir)
    for d in (run_dir / "checkpoints").iterdir():
        if d.name == "final" or int(d.name.split("_")[1]) > 5:
            shutil.rmtree(d)
    (run_dir / "result.json").unlink()

    from ftlab.probes import Probes

    original = Probes.capture_base

    def perturbed(self, model):
        out = original(self, model)
        self.base = [{**b, "logp": b["logp"] + 0.01} for b in self.base]
        return out

    monkeypatch.setattr(Probes, "capture_base", perturbed)
    result = run_from_dir(run_dir, progress=False)
    assert result["resumed_from"] == "step_000005"
    got, want = curve(run_dir), curve(ref)
    assert [r["step"] for r in got] == list(range(0, 10))
    assert [r["step"] for r in got if "probe_kl" in r] == [0, 3, 6, 9]
    assert got == want


# ----------------------------------------------------------------------------------------------- diagnostics
@pytest.mark.parametrize("method", ["lora", "full"])
def test_diagnostics_land_in_result_json_and_the_run_dir(method, tmp_path, ftlab_cache):
    run_dir, result = _run(tmp_path, method, [f"method={method}", "eval.probe_every=0"])
    diag = result["diagnostics"]
    assert diag["which"] == ["intruder", "update", "tuco"]
    w = diag["weights"]
    # the small world: 2 blocks x 7 linear maps, every one of them changed (LoRA targets all linear layers)
    assert w["n_matrices"] == 14 and w["n_changed"] == 14 and w["rel_update_mean"] > 0
    assert set(w["by_module"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(w["intruders"]) >= {"k10_eps0.5", "k50_eps0.9"}
    table = json.loads((run_dir / diag["files"]["weights"]).read_text())
    assert len(table["matrices"]) == 14
    assert sum(m["intruders"]["k10_eps0.5"] for m in table["matrices"]) == w["intruders"]["k10_eps0.5"]
    if method == "lora":  # a rank-8 update: its effective rank cannot exceed 8
        assert all(m["rank90"] <= 8 for m in table["matrices"])
    t = diag["tuco"]
    assert t["target"]["n"] == 16 and t["forget"]["n"] == 64  # eval.limit=16 target rows; 64 spread over 6 tasks
    assert 0 < t["target"]["mean"] < 1 and 0 < t["forget"]["mean"] < 1
    rows = [json.loads(line) for line in (run_dir / diag["files"]["tuco"]).open()]
    assert len(rows) == 80 and {r["task"] for r in rows if r["role"] == "forget"} == {
        "synth_add", "synth_rev", "synth_copy", "synth_succ", "synth_cnt", "synth_ppl"}
    assert t["target"]["mean"] == pytest.approx(sum(r["tuco"] for r in rows if r["role"] == "target") / 16)
    assert set(diag["meaning"]) >= {"intruders", "rel_update_mean", "tuco"}


def test_diagnostics_agree_with_a_direct_computation_on_the_saved_weights(tmp_path, ftlab_cache):
    """update profile from result.json == ftlab.diagnostics on the base (a fresh load) and the saved final model."""
    from transformers import AutoModelForCausalLM

    from ftlab.diagnostics import effective_weights, update_profile
    from ftlab.models import load_model_and_tokenizer
    from ftlab.runner import load_run_config

    run_dir, result = _run(tmp_path, "full", ["method=full", "eval.probe_every=0", "eval.diagnostics=[update]"])
    assert "tuco" not in result["diagnostics"] and "intruders" not in result["diagnostics"]["weights"]
    base, _ = load_model_and_tokenizer(load_run_config(run_dir).model)
    tuned = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "final")
    wb, wt = effective_weights(base), effective_weights(tuned)
    table = json.loads((run_dir / "diagnostics" / "weights.json").read_text())
    for m in table["matrices"]:
        assert m["rel_update"] == pytest.approx(update_profile(wb[m["name"]], wt[m["name"]])["rel_update"], rel=1e-9)


def test_diagnostics_config_is_checked_at_compose_time():
    from ftlab.diagnostics import DIAGNOSTICS
    from ftlab.schema import DIAGNOSTICS as SCHEMA_DIAGNOSTICS, ConfigError

    assert DIAGNOSTICS == SCHEMA_DIAGNOSTICS
    with pytest.raises(ConfigError, match="eval.diagnostics: unknown value 'intruders'"):
        check(["eval.diagnostics=[intruders]"])
    with pytest.raises(ConfigError, match="eval.diagnostics_n: must be >= 1"):
        check(["eval.diagnostics_n=0"])
