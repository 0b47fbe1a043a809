"""The embedded default shows what ftlab measures: the pretrained tiny world knows its skills (>= 95 %),
LoRA gains >= 30 points on the held-out target skill, and full fine-tuning on the same budget forgets
measurably (>= 5 points mean drop). This builds the real default world once (~1 min on 2 idle cores)."""

import pytest

from ftlab.cli.run import check
from ftlab.pipeline import run_from_dir
from ftlab.rundir.layout import prepare_run_dir


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory, ftlab_cache):
    out = {}
    for method in ("lora", "full"):
        (cfg,) = check([f"method={method}"])
        run_dir = tmp_path_factory.mktemp("default") / method
        prepare_run_dir(run_dir, cfg)
        out[method] = run_from_dir(run_dir, progress=False)
    return out


def test_base_model_knows_every_pretraining_skill(default_runs):
    tasks = default_runs["lora"]["tasks"]
    skills = [n for n, t in tasks.items() if t["role"] == "forget" and t["unit"] == "points"]
    assert len(skills) >= 5
    for name in skills:
        assert tasks[name]["base"] >= 95.0, (name, tasks[name]["base"])
    assert tasks["synth_sub"]["base"] < 10.0  # the target skill is new to the base model


def test_lora_gains_and_full_finetuning_forgets(default_runs):
    assert default_runs["lora"]["summary"]["gain"] >= 30.0
    assert default_runs["full"]["summary"]["forgetting"] >= 5.0
