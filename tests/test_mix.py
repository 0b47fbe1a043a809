"""data.mix: a share of general data (replay of the world's pretraining skills, or general text) in the training
stream; seeded; refused at compose time when it cannot be built."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from ftlab.cli.run import check
from ftlab.config.registry import ConfigError
from ftlab.data.sources import load_train, mix_count
from ftlab.train.batches import Batches

GSM8K = Path(__file__).parent / "fixtures" / "gsm8k_mini.jsonl"


def data_cfg(*overrides: str):
    (run,) = check(list(overrides))
    return run


@pytest.mark.parametrize("mix", [0.1, 0.25, 0.5])
def test_synth_replay_share_skills_and_seed(mix):
    run = data_cfg("data.n_train=300", f"data.mix={mix}")
    assert run.data.mix_skills == run.model.world.skills  # the synth YAML follows the world's skills
    rows = load_train(run.data, seed=0)
    general = [r for r in rows if r["id"].startswith("mix:")]
    task = [r for r in rows if not r["id"].startswith("mix:")]
    assert len(task) == 300 and len(general) == mix_count(300, mix)
    assert len(general) / len(rows) == pytest.approx(mix, abs=1 / len(rows))
    skills = Counter(r["prompt"].split(":")[0] for r in general)
    assert set(skills) == set(run.model.world.skills)
    assert max(skills.values()) - min(skills.values()) <= 1  # spread evenly over the skills
    assert all(r["prompt"].startswith("sub:") for r in task)
    assert load_train(run.data, seed=0) == rows  # seeded
    assert [r["id"] for r in load_train(run.data, seed=1) if r["id"].startswith("mix:")] != [r["id"] for r in general]


def test_mix_zero_is_the_unmixed_stream_and_the_batches_hold_the_share():
    plain = load_train(data_cfg("data.n_train=90").data, seed=0)
    assert plain == load_train(data_cfg("data.n_train=90", "data.mix=0").data, seed=0)
    rows = load_train(data_cfg("data.n_train=90", "data.mix=0.25", "data.mix_skills=[add,copy]").data, seed=0)
    assert rows[:90] == plain and len(rows) == 120
    is_mix = [r["id"].startswith("mix:") for r in rows]
    stream = Batches(is_mix, batch_size=10, seed=3)
    epoch = [x for _ in range(12) for x in stream.next()]  # one shuffled epoch: every row once
    assert sum(epoch) == 30
    assert 0 < sum(epoch[:40]) < 40  # shuffled in, not appended at the end


def test_general_text_from_jsonl(tmp_path):
    texts = tmp_path / "general.jsonl"
    texts.write_text("".join(json.dumps({"text": f"general text number {i}."}) + "\n" for i in range(5))
                     + json.dumps({"text": ""}) + "\n")
    run = data_cfg("data=gsm8k", f"data.path={GSM8K}", "model.name_or_path=tiny", "eval=target",
                   "data.mix=0.5", f"data.mix_source={texts}")
    rows = load_train(run.data, seed=0)
    general = [r for r in rows if r["id"].startswith("mix:")]
    assert len(general) == len(rows) - len(general) > 5  # more than the file holds: drawn again
    assert all(r["prompt"] == "" and r["response"].startswith("general text number") for r in general)
    assert Counter(r["response"] for r in general).most_common(1)[0][1] - min(
        Counter(r["response"] for r in general).values()) <= 1  # each pass uses every text once
    # a missing field is refused when the config is checked (ftlab.cli.inputs), before anything loads
    with pytest.raises(ConfigError, match="data.mix_source: .*general.jsonl:1: field 'body' is missing"):
        data_cfg("data=gsm8k", f"data.path={GSM8K}", "model.name_or_path=tiny", "eval=target",
                 "data.mix=0.5", f"data.mix_source={texts}", "data.mix_field=body")


@pytest.mark.parametrize("overrides,words", [
    (["data.mix=1"], ["data.mix", "[0, 1)"]),
    (["data.mix=-0.1"], ["data.mix"]),
    (["data.mix=0.2", "data.mix_skills=[fact]"], ["data.mix_skills", "'fact' is not a pretraining skill"]),
    (["data.mix=0.2", "data.mix_skills=[]"], ["data.mix_skills"]),
    (["data=gsm8k", f"data.path={GSM8K}", "model.name_or_path=tiny", "eval=target", "data.mix=0.2"],
     ["data.mix_source", "general text"]),
    (["data.mix=0.2", "data.mix_source=/no/such/general.jsonl"], ["data.mix_source", "does not exist"]),
])
def test_mix_refused_at_compose_time(overrides, words):
    with pytest.raises(ConfigError) as e:
        check(overrides)
    for w in words:
        assert w in str(e.value)
