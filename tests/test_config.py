"""Config refusal: bad input is refused at compose time, naming the full key, before torch is imported."""

import os
import subprocess
import sys
import time

import pytest
import yaml

from ftlab.cli.run import _hydra_message, check, run_command
from ftlab.config.registry import ConfigError
from ftlab.config.validate import validate

BAD = [
    # (overrides, words the message must contain)
    (["method=lorra"], ["method=lorra", "full", "lora"]),
    (["method.r=0"], ["method.r", ">= 1"]),
    (["method.rr=3"], ["method.rr", "unknown key", "alpha"]),
    (["+method.rr=3"], ["method.rr"]),
    (["method=full", "method.r=4"], ["method.r", "unknown key"]),
    (["train.lr=abc"], ["train.lr", "Float"]),
    (["train.lr=-1"], ["train.lr", "> 0"]),
    (["train.max_steps=0"], ["train.max_steps", ">= 1"]),
    (["train.max_steps=1.5"], ["train.max_steps", "Integer"]),
    (["train.batch_size=-4"], ["train.batch_size"]),
    (["train.schedule=cos"], ["train.schedule", "cosine"]),
    (["train.adam_beta2=1.5"], ["train.adam_beta2"]),
    (["train.lrr=1"], ["train.lrr", "unknown key", "max_steps"]),
    (["hw.precision=fp8"], ["hw.precision", "bf16"]),
    (["hw.device=tpu"], ["hw.device", "cuda"]),
    (["eval.limit=0"], ["eval.limit"]),
    (["logger.mode=cloud"], ["logger.mode", "offline"]),
    (["seed=abc"], ["seed"]),
    (["+foo=1"], ["foo", "unknown top-level key"]),
    (["data=nope"], ["data=nope", "synth_sub"]),
    (["data.skill=mul"], ["data.skill", "rot1"]),
    (["data.path=/no/such/file.jsonl"], ["data.path", "/no/such/file.jsonl"]),
    (["model.name_or_path=./no_such_dir"], ["model.name_or_path", "no_such_dir"]),
    (["model.world.hidden_size=100"], ["model.world.hidden_size", "num_heads"]),
    (["model.world.skills=[add,mul]"], ["model.world.skills", "mul"]),
    (["model=qwen2.5-0.5b"], ["model=tiny"]),  # synthetic data needs the tiny world
    (["model.world.stepz=1"], ["model.world.stepz", "steps"]),
]


def _refusal(overrides):
    from hydra.errors import HydraException

    try:
        check(overrides)
    except ConfigError as e:
        return str(e)
    except HydraException as e:
        return _hydra_message(str(e), str(e.__cause__ or ""), overrides)
    return None


@pytest.mark.parametrize("overrides,words", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_is_refused_with_the_key_named(overrides, words):
    msg = _refusal(overrides)
    assert msg is not None, f"{overrides} was accepted"
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_default_and_sweep_configs_are_accepted():
    (run,) = check([])
    assert run.method.name == "lora" and run.model.name_or_path == "tiny" and run.data.skill == "sub"
    runs = check(["method=full,lora", "seed=0,1"], multirun=True)
    assert sorted((r.method.name, r.seed) for r in runs) == [("full", 0), ("full", 1), ("lora", 0), ("lora", 1)]


def test_every_job_of_a_sweep_is_validated():
    with pytest.raises(ConfigError, match="train.max_steps"):
        check(["train.max_steps=10,0"], multirun=True)


def test_validate_round_trips_a_resolved_config():
    from ftlab.config.schema import to_container

    (run,) = check(["method=full", "train.lr=3e-4"])
    assert validate(to_container(run)) == run


def test_refusal_is_fast_imports_no_torch_and_leaves_no_run_dir(tmp_path):
    env = {**os.environ, "FTLAB_OUTPUTS": str(tmp_path / "out")}
    code = ("import sys; from ftlab.cli import main; rc = main(['run', 'method=lora', 'method.r=0']); "
            "print('TORCH' if 'torch' in sys.modules else 'NOTORCH'); sys.exit(rc)")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    wall = time.perf_counter() - t0
    assert p.returncode == 2, p.stderr
    assert "method.r" in p.stderr and "NOTORCH" in p.stdout
    assert wall < 2.0, f"refusal took {wall:.2f} s"
    assert not (tmp_path / "out").exists()


def test_cli_console_script_refuses(tmp_path):
    import shutil

    exe = shutil.which("ftlab")
    if exe is None:
        pytest.fail("the ftlab console script is not installed (pip install -e .)")
    p = subprocess.run([exe, "run", "method=lorra"], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "FTLAB_OUTPUTS": str(tmp_path / "o")})
    assert p.returncode == 2 and "valid choices:" in p.stderr
    assert "full" in p.stderr and "lora" in p.stderr
    assert not (tmp_path / "o").exists()


def test_help_lists_groups_and_options(capsys):
    assert run_command(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("model", "data", "method", "eval", "hw", "logger", "tiny", "synth_sub", "lora", "full",
                 "train.max_steps", "eval.limit"):
        assert word in out


def test_cfg_job_prints_the_composed_config(capfd):
    assert run_command(["--cfg", "job", "method=full"]) == 0
    out = capfd.readouterr().out
    assert "name: full" in out and "max_steps" in out


def test_a_sweep_written_in_an_experiment_is_validated_before_any_job_starts(tmp_path):
    """`-m +experiment=lora_vs_full` sweeps method x seed from the YAML's hydra.sweeper.params: every job is
    composed and validated up front (the command line wins per key), so a job the sweep makes invalid refuses the
    whole sweep before any run directory exists."""
    jobs = check(["+experiment=lora_vs_full"], multirun=True)
    assert sorted((j.method.name, j.seed) for j in jobs) == [(m, s) for m in ("full", "lora") for s in (0, 1, 2)]
    assert sorted(j.seed for j in check(["+experiment=lora_vs_full", "seed=5"], multirun=True)) == [5, 5]
    env = {**os.environ, "FTLAB_OUTPUTS": str(tmp_path / "out")}
    p = subprocess.run([sys.executable, "-m", "ftlab", "run", "-m", "+experiment=lora_vs_full", "method.r=4"],
                       env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and "method.r" in p.stderr, p.stderr[-2000:]  # method=full has no rank
    assert not (tmp_path / "out").exists()


def test_a_config_is_validated_once_per_process(tmp_path, monkeypatch, ftlab_cache):
    """`ftlab run` in one process: the CLI's check, the run directory's name, the Hydra job and the worker reading
    config.yaml back all see the same config; it is checked once."""
    from conftest import FAST

    import ftlab.config.validate as schema

    calls = []
    real = schema._validate
    monkeypatch.setattr(schema, "_validate", lambda cfg: calls.append(1) or real(cfg))
    monkeypatch.setattr(schema, "_VALIDATED", {})
    monkeypatch.setenv("FTLAB_OUTPUTS", str(tmp_path / "out"))
    monkeypatch.chdir(tmp_path)
    assert run_command([*FAST, "train.max_steps=2", "eval.limit=2", "seed=11"]) == 0
    assert len(list((tmp_path / "out").glob("runs/*/result.json"))) == 1
    assert len(calls) == 1


@pytest.mark.parametrize("method,lr,scaled", [
    ("full", 1e-5, 1e-5), ("hft", 1e-5, 1e-5), ("owlore", 1e-5, 1e-5), ("lora", 1e-4, 1e-4), ("dora", 1e-4, 1e-4),
    ("pissa", 2e-5, 2e-5), ("ia3", 1e-4, 3e-3), ("prompt_tuning", 1e-3, 3e-2)])
def test_learning_rate_follows_the_method_on_a_real_model_and_on_the_world(method, lr, scaled, capsys):
    """train.lr null: the method's default on a real model, 30x that on the tiny world (full 3e-4, LoRA 3e-3)
    (whole-matrix methods 1e-5, LoRA-style adapters 1e-4, an order of magnitude apart; PiSSA its authors' 2e-5);
    a YAML lr_scale still multiplies it (ia3 3e-3, prompt tuning 3e-2); an explicit train.lr wins; `ftlab run
    --cfg job` (and --cfg=job, -p train) prints the number the run trains at."""
    from pathlib import Path

    real = [f"method={method}", "model=qwen2.5-0.5b", "data=gsm8k", "eval=target",
            f"data.path={Path(__file__).parent / 'fixtures' / 'gsm8k_mini.jsonl'}"]
    assert check([f"method={method}"])[0].train.lr == float(f"{lr * 30:.6g}")
    (run,) = check(real)
    assert run.train.lr == lr and run.train.lr * run.method.lr_scale == pytest.approx(scaled)
    assert check([*real, "train.lr=2e-5"])[0].train.lr == 2e-5
    for flags in (["--cfg", "job"], ["--cfg=job"], ["-c", "job", "-p", "train"]):
        capsys.readouterr()
        assert run_command([*flags, *real]) == 0
        out = yaml.safe_load(capsys.readouterr().out)
        assert out["train"]["lr"] == lr
    assert run_command(["--cfg", "job", "-p", "train.lr", *real]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == {"lr": lr}


def test_validation_split_is_refused_where_a_task_has_none(tmp_path):
    """eval.validation=true needs a validation split for every task, said before anything loads."""
    assert check(["eval.validation=true"])[0].eval.validation  # the world and synth data have one
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "q", "answer": "a"}\n')
    real = ["model=smollm2-135m", "data=gsm8k", "eval=quick", "eval.validation=true"]
    assert check(real + ["eval.forget=[arc_easy]", "eval.target=[data,mmlu]", f"data.validation_path={rows}"])
    with pytest.raises(ConfigError, match=r"eval.validation: data \(gsm8k\) has no validation split"):
        check(real + ["eval.forget=[arc_easy]"])
    with pytest.raises(ConfigError, match=r"eval.validation: task 'hellaswag' has no validation split"):
        check(real + ["eval.forget=[hellaswag]", f"data.validation_path={rows}"])
    with pytest.raises(ConfigError, match=r"data \(mine\) has no validation split; give data.validation_path"):
        check([f"data.path={rows}", "data.name=mine", "data.source=jsonl", "eval.validation=true"])
    with pytest.raises(ConfigError, match="data.validation_path: file"):
        check([f"data.path={rows}", "data.source=jsonl", f"data.validation_path={tmp_path / 'no.jsonl'}"])
    with pytest.raises(ConfigError, match="eval.curve_every"):
        check(["eval.curve_every=-1"])
