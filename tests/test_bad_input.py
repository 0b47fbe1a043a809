"""Bad input never becomes a wrong number (issue 11): a run's identity follows the content of its input files,
broken items, predictions and models fail with the culprit named (and are never cached), train/eval overlap is
measured and full overlap refused, and data.mix stays in a range that can be built."""

from __future__ import annotations

import copy
import json
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
