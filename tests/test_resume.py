"""Exact resume (issue 5): SIGKILL real training processes at random steps, resume, and get a loss curve and
final weights bit-identical to an uninterrupted run (fp32, CPU); dropping any one saved component breaks that.

The model is a tiny local Llama with a character tokenizer and a small jsonl of additions (no synthetic world
to build), so the whole file stays well under a minute of CPU per process start. Kill points are random; the
seed is printed (set FTLAB_CHAOS_SEED to replay one).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ftlab.cli.run import check
from ftlab.config.registry import ConfigError
from ftlab.pipeline import run_from_dir
from ftlab.rundir.layout import prepare_run_dir
from ftlab.train.checkpoint import (
    COMPONENTS,
    ResumeRefused,
    complete_checkpoints,
    latest,
)

CURVE_KEYS = ("step", "loss", "lr", "grad_norm", "tokens")  # everything but wall-clock fields
KILL_STEPS = 40


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama + printable-ASCII char tokenizer as a local model dir, and a jsonl of short additions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("resume_assets")
    model_dir = root / "model"
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + chars)}
    ct = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    ct.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    ct.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=ct, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(model_dir)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    r = random.Random(0)
    data = root / "add.jsonl"
    with open(data, "w") as f:
        for _ in range(48):
            a, b = r.randint(1, 50), r.randint(1, 50)
            f.write(json.dumps({"question": f"Add {a} and {b}.", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}) + "\n")
    return model_dir, data


def overrides(assets, *extra):
    model_dir, data = assets
    # batch 4 over ~40 training rows: the data position crosses epochs; warmup + cosine: the LR moves every
    # step; LoRA dropout: the torch RNG matters.
    return [f"model.name_or_path={model_dir}", "data=gsm8k", f"data.path={data}", "eval=target", "eval.limit=2",
            "data.max_new_tokens=2", "model.max_length=64", "train.batch_size=4", "train.log_every=1",
            "train.warmup_steps=3", "train.save_every=1", "hw.num_threads=1", "hw.precision=fp32",
            "method=lora", "method.dropout=0.1", *extra]


def make_run(tmp_path, name, ovr):
    (cfg,) = check(ovr)
    run_dir = tmp_path / name
    prepare_run_dir(run_dir, cfg)
    return run_dir


def curve(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r.get(k) for k in CURVE_KEYS} for r in rows]


def final_weights(run_dir):
    final = run_dir / "checkpoints" / "final"
    (f,) = [p for p in final.glob("*.safetensors")]
    return load_file(str(f))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _env():
    env = dict(os.environ)
    env.pop("FTLAB_RESUME_DROP", None)
    env["FTLAB_PROGRESS"] = "0"
    return env


WORKER = "import sys; from ftlab.pipeline import run_from_dir; run_from_dir(sys.argv[1], progress=False)"


def _latest_step(run_dir):
    done = complete_checkpoints(run_dir / "checkpoints")
    return int(done[-1].name.split("_")[1]) if done else 0


# --------------------------------------------------------------------------------------- SIGKILL, resume
@pytest.fixture(scope="module")
def reference_40(assets, tmp_path_factory, ftlab_cache):
    run_dir = make_run(tmp_path_factory.mktemp("ref40"), "ref",
                       overrides(assets, f"train.max_steps={KILL_STEPS}", "train.keep_checkpoints=100"))
    result = run_from_dir(run_dir, progress=False)
    assert result["status"] == "completed" and result["resumed_from"] is None
    return run_dir


def test_sigkill_at_random_steps_resumes_bit_identical(assets, reference_40, tmp_path):
    seed = int(os.environ.get("FTLAB_CHAOS_SEED", random.SystemRandom().randrange(2**31)))
    print(f"FTLAB_CHAOS_SEED={seed}")
    rng = random.Random(seed)
    targets = sorted(rng.sample(range(2, KILL_STEPS - 6), 5))
    run_dir = make_run(tmp_path, "chaos", overrides(assets, f"train.max_steps={KILL_STEPS}",
                                                    "train.keep_checkpoints=2"))
    kills, resumed_at = 0, []
    log = open(tmp_path / "worker.log", "ab")
    for target in targets + [None]:
        resumed_at.append(_latest_step(run_dir))
        p = subprocess.Popen([sys.executable, "-c", WORKER, str(run_dir)], env=_env(), stdout=log, stderr=log)
        if target is None:
            assert p.wait(timeout=120) == 0, (tmp_path / "worker.log").read_text()[-3000:]
            break
        target = max(target, resumed_at[-1] + 1)  # progress past the checkpoint it resumed from
        deadline = time.monotonic() + 120
        while _latest_step(run_dir) < target and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.06))  # somewhere in the next step or two (or a checkpoint write)
        assert p.poll() is None, f"worker ended before the kill at step {target}: rc {p.returncode}"
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    log.close()
    print(f"kill targets {targets}, resumed from steps {resumed_at}")
    assert kills == 5
    assert resumed_at[0] == 0 and all(b > a for a, b in zip(resumed_at, resumed_at[1:]))
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["resumed_from"] == f"step_{resumed_at[-1]:06d}"

    got, want = curve(run_dir), curve(reference_40)
    assert [r["step"] for r in got] == list(range(1, KILL_STEPS + 1))  # no duplicated or missing rows
    assert got == want  # every logged value, exactly (JSON round-trips floats exactly)
    assert same_weights(final_weights(run_dir), final_weights(reference_40))
    assert result["train"]["final_loss"] == json.loads((reference_40 / "result.json").read_text())["train"][
        "final_loss"]
    # keep_checkpoints=2: only the newest two step checkpoints (both complete) are left, no temp dirs
    left = {d.name for d in (run_dir / "checkpoints").iterdir()}
    assert left == {f"step_{KILL_STEPS - 1:06d}", f"step_{KILL_STEPS:06d}", "final"}


# ------------------------------------------------------------------------ each component is needed
@pytest.fixture(scope="module")
def reference_12(assets, tmp_path_factory, ftlab_cache):
    """Uninterrupted 12-step runs with every step's checkpoint kept: LoRA with dropout; full fine-tuning (the
    whole model is the trainable state); LISA (method state);
    LISA with L2-SP (regulariser state: which blocks are anchored, in which order)."""
    root = tmp_path_factory.mktemp("ref12")
    runs = {}
    lisa = ["method=lisa", "method.interval=2"]
    for name, extra in {"lora": [], "full": ["method=full"], "lisa": lisa,
                        "lisa_l2sp": [*lisa, "reg=l2sp", "reg.weight=1.0"]}.items():
        ovr = [o for o in overrides(assets, "train.max_steps=12", "train.keep_checkpoints=100", *extra)
               if not (name != "lora" and o == "method.dropout=0.1")]
        run_dir = make_run(root, name, ovr)
        run_from_dir(run_dir, progress=False)
        runs[name] = run_dir
    return runs


def resume_copy(ref, dst, at_step):
    """A copy of a finished run cut back to a checkpoint: as if it had been killed right after `at_step`."""
    shutil.copytree(ref, dst)
    for d in (dst / "checkpoints").iterdir():
        if d.name == "final" or int(d.name.split("_")[1]) > at_step:
            shutil.rmtree(d)
    (dst / "result.json").unlink()
    return dst


# LoRA has no method or regulariser state; LISA's sampler is; L2-SP's anchors are
CASES = [("lora", None), *[("lora", c) for c in COMPONENTS if c not in ("method", "reg")],
         ("full", None), ("full", "weights"), ("lisa", None), ("lisa", "method"),
         ("lisa_l2sp", None), ("lisa_l2sp", "reg")]


@pytest.mark.parametrize("run,drop", CASES, ids=[f"{r}-{d or 'nothing'}" for r, d in CASES])
def test_dropping_any_component_breaks_equality(run, drop, reference_12, tmp_path, monkeypatch):
    ref = reference_12[run]
    run_dir = resume_copy(ref, tmp_path / "resumed", at_step=5)
    if drop:
        monkeypatch.setenv("FTLAB_RESUME_DROP", drop)
    result = run_from_dir(run_dir, progress=False)
    assert result["resumed_from"] == "step_000005"
    got, want = curve(run_dir), curve(ref)
    assert got[:5] == want[:5] and [r["step"] for r in got] == list(range(1, 13))
    identical = got == want and same_weights(final_weights(run_dir), final_weights(ref))
    assert identical is (drop is None), f"dropping {drop}: the resumed run is {'still' if identical else 'not'} " \
                                        "identical"


# ---------------------------------------------------------------------------------- refusals and markers
def test_completed_run_is_not_rerun(reference_12):
    run_dir = reference_12["lora"]
    before = (run_dir / "result.json").stat().st_mtime_ns, (run_dir / "metrics.jsonl").read_text()
    result = run_from_dir(run_dir, progress=False)
    assert result == json.loads((run_dir / "result.json").read_text()) and result["status"] == "completed"
    assert ((run_dir / "result.json").stat().st_mtime_ns, (run_dir / "metrics.jsonl").read_text()) == before


def test_changed_config_is_refused_naming_the_change(reference_12, tmp_path):
    run_dir = resume_copy(reference_12["lora"], tmp_path / "changed", at_step=5)
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    old = cfg["train"]["lr"]
    cfg["train"]["lr"] = old * 2
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    curve_before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ResumeRefused, match=rf"train\.lr: {old} -> {old * 2}"):
        run_from_dir(run_dir, progress=False)
    assert (run_dir / "metrics.jsonl").read_text() == curve_before  # nothing touched
    assert not (run_dir / "result.json").exists()


def test_incomplete_or_corrupt_checkpoint_is_never_used(reference_12, tmp_path, capfd):
    run_dir = resume_copy(reference_12["lora"], tmp_path / "torn", at_step=6)
    ck = run_dir / "checkpoints"
    (ck / "step_000006" / "COMPLETE").unlink()  # killed before the marker
    shutil.copytree(ck / "step_000005", ck / "step_000007.tmp")  # killed before the rename
    (ck / "step_000005" / "optimizer.pt").write_bytes(b"torn")  # corrupt despite its marker
    found = latest(run_dir)
    assert found is not None and found.path.name == "step_000004"
    assert "step_000005 rejected" in capfd.readouterr().err


def test_keep_checkpoints_range_check(assets):
    with pytest.raises(ConfigError, match="train.keep_checkpoints"):
        check(overrides(assets, "train.keep_checkpoints=0"))


def test_one_process_per_run_dir(reference_12, tmp_path):
    import fcntl

    from ftlab.rundir.layout import RunDirBusy

    run_dir = resume_copy(reference_12["lora"], tmp_path / "busy", at_step=5)
    with open(run_dir / ".lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RunDirBusy, match="another process"):
            run_from_dir(run_dir, progress=False)
