"""Evaluation inside runs, on the small world: in-training probes (the forgetting curve and its exact resume),
diagnostics in result.json, and the continual protocol (data as a list of stages)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST
from safetensors.torch import load_file
from test_resume import assets  # noqa: F401 - fixture: a tiny local Llama and a jsonl (the multi-process test)

from ftlab.cli.run import check
from ftlab.pipeline import run_from_dir
from ftlab.rundir.layout import prepare_run_dir

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
    """Probes, the scored trajectory (eval.curve_every) and the validation split ride along with training: the
    same weights and test scores as a run without them."""
    probed, with_probes = _run(tmp_path, "probed", ["method=full", "eval.probe_every=5", "eval.curve_every=10",
                                                     "eval.curve_limit=8", "eval.validation=true"])
    plain, without = _run(tmp_path, "plain", ["method=full", "eval.probe_every=0"])
    # the trajectory: step 0 is the base on the same 8 items, its gain/forgetting are against that row
    traj = [json.loads(line) for line in (probed / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in traj] == [0, 10, 20]
    assert traj[0]["gain"] == 0 and traj[0]["forgetting"] == 0 and set(traj[0]["n"].values()) == {8}
    assert set(traj[0]["tasks"]) == set(with_probes["tasks"])
    target = next(k for k, t in with_probes["tasks"].items() if t["role"] == "target")
    assert traj[-1]["gain"] == pytest.approx(traj[-1]["tasks"][target] - traj[0]["tasks"][target])
    assert not (plain / "curve.jsonl").exists() and "validation" not in without
    # validation: the same tasks on items disjoint from the test items, base and tuned, with a summary
    val = with_probes["validation"]
    assert set(val["tasks"]) == set(with_probes["tasks"]) and val["summary"]["gain"] is not None
    ids = lambda stage, name: {json.loads(x)["id"] for x in (probed / "records" / stage / f"{name}.jsonl").open()}  # noqa: E731
    assert ids("validation_tuned", target) and not ids("validation_tuned", target) & ids("tuned", target)
    test_prompts = {json.loads(x)["prompt"] for x in (probed / "records" / "tuned" / f"{target}.jsonl").open()}
    val_prompts = {json.loads(x)["prompt"] for x in (probed / "records" / "validation_tuned" / f"{target}.jsonl").open()}
    assert not test_prompts & val_prompts
    assert with_probes["tasks"]["synth_add"]["chance"] == 0.0
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
           "train.keep_checkpoints=100", "eval.probe_every=3", "eval.diagnostics=[]", "eval.curve_every=4",
           "eval.curve_limit=10"]
    ref, _ = _run(tmp_path, "ref", ovr)
    assert (ref / "checkpoints" / "step_000005" / "probes.pt").is_file()
    run_dir = tmp_path / "resumed"
    shutil.copytree(ref, run_dir)
    for d in (run_dir / "checkpoints").iterdir():
        if d.name == "final" or int(d.name.split("_")[1]) > 5:
            shutil.rmtree(d)
    (run_dir / "result.json").unlink()

    from ftlab.eval.probes import Probes

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
    # the scored trajectory too: rows after the checkpoint are re-scored, the step-0 base is read back
    traj = lambda d: [{k: v for k, v in json.loads(x).items() if k != "curve_s"}  # noqa: E731
                      for x in (d / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in traj(run_dir)] == [0, 4, 8, 9] and traj(run_dir) == traj(ref)


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
    """update profile from result.json == ftlab.eval.diagnostics on the base (a fresh load) and the saved final model."""
    from transformers import AutoModelForCausalLM

    from ftlab.config.files import load_run_config
    from ftlab.eval.diagnostics import effective_weights, update_profile
    from ftlab.models.loading import load_model_and_tokenizer

    run_dir, result = _run(tmp_path, "full", ["method=full", "eval.probe_every=0", "eval.diagnostics=[update]"])
    assert "tuco" not in result["diagnostics"] and "intruders" not in result["diagnostics"]["weights"]
    base, _ = load_model_and_tokenizer(load_run_config(run_dir).model)
    tuned = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "final")
    wb, wt = effective_weights(base), effective_weights(tuned)
    table = json.loads((run_dir / "diagnostics" / "weights.json").read_text())
    for m in table["matrices"]:
        assert m["rel_update"] == pytest.approx(update_profile(wb[m["name"]], wt[m["name"]])["rel_update"], rel=1e-9)


def test_diagnostics_config_is_checked_at_compose_time():
    from ftlab.config.registry import ConfigError
    with pytest.raises(ConfigError, match="eval.diagnostics: unknown value 'intruders'"):
        check(["eval.diagnostics=[intruders]"])
    with pytest.raises(ConfigError, match="eval.diagnostics_n: must be >= 1"):
        check(["eval.diagnostics_n=0"])


# ------------------------------------------------------------------------------------------------ continual
# rot1 then sub with full fine-tuning on the small world: 200 steps at lr 1e-2 learn rot1 (>= 90 points for
# seeds 0 and 1, measured); 200 steps of sub then wipe it out.
CONTINUAL = ["data=[synth_rot1,synth_sub]", "method=full", "train.max_steps=200", "train.lr=1e-2",
             "data.n_train=2000", "eval.probe_every=50", "eval.diagnostics=[]"]


@pytest.fixture(scope="module")
def continual_run(tmp_path_factory, ftlab_cache):
    return _run(tmp_path_factory.mktemp("continual"), "ref", CONTINUAL)


def _mean_score(path):
    rows = [json.loads(line) for line in path.open()]
    return sum(r["score"] for r in rows) / len(rows)


def test_continual_r_matrix_bookkeeping(continual_run):
    from ftlab.continual import continual_metrics

    run_dir, result = continual_run
    c = result["continual"]
    names = ["synth_rot1", "synth_sub"]
    assert c["stages"] == names and len(c["R"]) == 2 and all(len(row) == 2 for row in c["R"])
    # R[0][j]: every stage's target scored after stage 0, from its own records; R[1][j]: the tuned evaluation
    assert c["R"][0] == [_mean_score(run_dir / "records" / "stage_0" / f"{n}.jsonl") for n in names]
    assert c["R"][1] == [result["tasks"][n]["tuned"] for n in names]
    assert c["base"] == [result["tasks"][n]["base"] for n in names]
    assert all(result["tasks"][n]["role"] == "target" for n in names)
    want = continual_metrics(c["R"], base=c["base"], names=names)
    assert {k: c[k] for k in want} == want
    assert c["higher_is_better"]["forgetting"] is False and c["records"] == ["records/stage_0", "records/tuned"]
    # one curve over both stages: steps continue, rows carry their stage, stage 1 starts from stage 0's end
    rows = curve(run_dir)
    assert [r["step"] for r in rows if "probe_kl" in r] == [0, 50, 100, 150, 200, 250, 300, 350, 400]
    assert {r["stage"] for r in rows if r["step"] <= 200 and r["step"]} == {0}
    assert {r["stage"] for r in rows if r["step"] > 200} == {1}
    assert rows[-1]["step"] == 400 and all(r["probe_kl"] > 0 for r in rows if r["step"] and "probe_kl" in r)
    tr = result["train"]
    assert tr["steps"] == 400 and [s["name"] for s in tr["stages"]] == names
    assert tr["tokens"] == sum(s["tokens"] for s in tr["stages"])
    log = json.loads((run_dir / "stages.json").read_text())
    assert [r["stage"] for r in log] == [0, 1] and log[0]["scores"] == dict(zip(names, c["R"][0]))


def test_stage_two_forgets_stage_one_with_full_fine_tuning(continual_run):
    _, result = continual_run
    c = result["continual"]
    learnt, after = c["R"][0][0], c["R"][1][0]
    assert c["learning"]["synth_rot1"] >= 50, c["R"]  # stage 0 learnt rot1 ...
    assert after <= learnt - 40 and c["forgetting"]["synth_rot1"] == learnt - after  # ... and stage 1 undid it
    assert c["bwt"] == after - learnt and c["bwt"] <= -40


# Short stages for the resume cases (no learning needed): HFT re-draws its trained half in stage 1, so a resume
# after a stage must restore what every earlier stage trained; LoRA with dropout makes the RNG state matter.
RESUMABLE = {"hft": ["method=hft"], "lora": ["method=lora", "method.dropout=0.1"]}
SHORT = ["data=[synth_rot1,synth_sub]", "train.max_steps=20", "train.save_every=5", "train.keep_checkpoints=100",
         "train.log_every=1", "eval.probe_every=5", "eval.diagnostics=[]"]


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory, ftlab_cache):
    root = tmp_path_factory.mktemp("continual_short")
    return {m: _run(root, m, SHORT + extra) for m, extra in RESUMABLE.items()}


@pytest.mark.parametrize("method,where", [("hft", "mid_stage"), ("hft", "stage_boundary"),
                                          ("hft", "after_last_stage"), ("lora", "mid_stage")])
def test_continual_run_resumes_exactly(method, where, short_runs, tmp_path, monkeypatch):
    """Interrupted inside stage 1 (after its step-30 checkpoint), right after stage 0 was logged (stage 1 then
    starts from the stage-0 snapshot), or after the last stage (the tuned evaluation then runs on the restored
    stage-1 snapshot), then resumed: the same R, curve and final weights as the uninterrupted run."""
    import ftlab.continual
    import ftlab.train.checkpoint
    from ftlab.pipeline import RunFailed

    class Interrupted(Exception):
        pass

    if where == "mid_stage":
        real = ftlab.train.checkpoint.save_state

        def save_then_stop(path, **kw):
            real(path, **kw)
            if path.name == "step_000030":
                raise Interrupted

        monkeypatch.setattr(ftlab.train.checkpoint, "save_state", save_then_stop)
    else:
        real_log, stop_after = ftlab.continual.write_stage_log, 1 if where == "stage_boundary" else 2

        def log_then_stop(run_dir, rows):
            real_log(run_dir, rows)
            if len(rows) == stop_after:
                raise Interrupted

        monkeypatch.setattr(ftlab.continual, "write_stage_log", log_then_stop)
    with pytest.raises(RunFailed, match="Interrupted"):
        _run(tmp_path, "cut", SHORT + RESUMABLE[method])
    monkeypatch.undo()
    run_dir = tmp_path / "cut"
    result = run_from_dir(run_dir, progress=False)
    ref_dir, ref = short_runs[method]
    assert result["status"] == "completed"
    assert result["resumed_from"] == {"mid_stage": "step_000030", "stage_boundary": "step_000020",
                                      "after_last_stage": "step_000040"}[where]
    assert result["continual"]["R"] == ref["continual"]["R"]
    assert curve(run_dir) == curve(ref_dir)
    a, b = final_weights(run_dir), final_weights(ref_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if method == "hft":  # stage 1 trained another half than stage 0: both halves moved away from the base
        sel = json.loads((run_dir / "checkpoints" / "final" / "hft_selection.json").read_text())
        assert sel["stages"]["0"] != sel["stages"]["1"]


def test_continual_stages_are_checked_at_compose_time():
    from ftlab.config.registry import ConfigError

    (cfg,) = check(["data=[synth_sub,synth_rot1]", "data.n_train=256"])
    assert [s.name for s in cfg.stages] == ["synth_sub", "synth_rot1"] and cfg.data == cfg.stages[0]
    assert [s.n_train for s in cfg.stages] == [256, 256]  # data.* overrides apply to every stage
    assert [s.skill for s in cfg.stages] == ["sub", "rot1"]
    (same,) = check(["stages=[synth_sub,synth_rot1]", "data.n_train=256"])
    assert same == cfg
    for bad, msg in [(["data=[synth_sub,synth_rot2]"], r"stages\[1\]: unknown value 'synth_rot2'; valid choices: "),
                     (["data=[synth_sub,synth_sub]"], "stages: .* appear more than once"),
                     (["data=[synth_sub]"], "at least two stages"),
                     (["data=[synth_sub,synth_rot1]", "eval.target=[gsm8k]"], "eval.target: a continual run"),
                     (["data=[synth_sub,synth_rot1]", "hw.nproc=2"], "stages: continual runs use one process")]:
        with pytest.raises(ConfigError, match=msg):
            check(bad)


# ------------------------------------------------------------------------------------ probes, several processes
@pytest.mark.parametrize("strategy,method", [("fsdp", "full")])  # ddp + lora passes too (measured; 12 s more)
def test_probes_with_two_processes_match_one(strategy, method, assets, tmp_path, ftlab_cache):
    """Every rank probes at the same steps (FSDP's forward gathers shards, a collective: a probe on rank 0 alone
    would hang); rank 0 writes: the probe curve of 2 gloo processes equals one process's within the distributed
    tolerance. A local model: WikiText probes, from the fixture."""
    from test_dist import TOL, full_ft, launch, one_process, two_procs
    from test_resume import make_run, overrides

    wikitext = Path(__file__).parent / "fixtures" / "eval" / "wikitext.json"
    ovr = overrides(assets, *two_procs(f"hw.strategy={strategy}", f"method={method}", "train.save_every=0",
                                       "eval.probe_every=4", f"eval.paths.wikitext={wikitext}"))
    ovr = full_ft(ovr) if method == "full" else ovr
    one = one_process(tmp_path, ovr)
    run_dir = make_run(tmp_path, "two", ovr)
    log = open(tmp_path / "torchrun.log", "wb")
    assert launch(run_dir, stdout=log, stderr=log).wait(timeout=300) == 0, \
        (tmp_path / "torchrun.log").read_text()[-3000:]
    pa, pb = ([r for r in curve(d) if "probe_kl" in r] for d in (one, run_dir))
    assert [r["step"] for r in pa] == [r["step"] for r in pb] == [0, 4, 8, 12]
    for ra, rb in zip(pa, pb):
        assert abs(ra["probe_ppl"] - rb["probe_ppl"]) <= TOL * ra["probe_ppl"]
        assert abs(ra["probe_kl"] - rb["probe_kl"]) <= TOL * max(ra["probe_kl"], 1e-3)
    assert pa[-1]["probe_kl"] > 0
