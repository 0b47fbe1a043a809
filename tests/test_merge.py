"""`ftlab merge` (issue 16) on the small world: a merge of one run is that run, the full-weight and LoRA paths agree
on the same delta, different bases are refused by name, two targets merge into one run directory that ftlab report
reads, greedy soup selects on validation, and a saved merge loads in transformers with the base's names and dtypes."""

import json
import shutil

import pytest
import torch
import yaml
from conftest import FAST
from safetensors.torch import load_file

from ftlab.cli.run import check
from ftlab.config.post import MergeConfig
from ftlab.pipeline import run_from_dir
from ftlab.post.merge import MergeRefused, merge_runs
from ftlab.rundir.layout import prepare_run_dir

ONE = ["hw.num_threads=1", "eval.validation=true"]


def _run(root, name, overrides):
    (cfg,) = check(FAST + ONE + list(overrides))
    run_dir = root / name
    prepare_run_dir(run_dir, cfg)
    run_from_dir(run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ftlab_cache, one_thread):
    root = tmp_path_factory.mktemp("merge_inputs")
    return {"sub": _run(root, "sub", ["method=full"]), "rot1": _run(root, "rot1", ["method=full", "data=synth_rot1"]),
            "lora": _run(root, "lora", ["method=lora"])}


def _final(run_dir):
    (f,) = (run_dir / "checkpoints" / "final").glob("*.safetensors")
    return load_file(str(f))


def _saved(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_a_soup_of_one_run_is_that_run(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, result = merge_runs([runs["sub"]], MergeConfig(method="soup", save=True, out_dir=str(tmp_path)))
    src = yaml.safe_load((runs["sub"] / "config.yaml").read_text())
    ref = json.loads((runs["sub"] / "result.json").read_text())
    assert result["status"] == "completed"
    assert {k: v["tuned"] for k, v in result["tasks"].items()} == {k: v["tuned"] for k, v in ref["tasks"].items()}
    assert (run_dir / "records" / "tuned" / "synth_sub.jsonl").read_text() == \
        (runs["sub"] / "records" / "tuned" / "synth_sub.jsonl").read_text()
    saved, final = _saved(run_dir), _final(runs["sub"])
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in final)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")  # an ordinary HF directory
    assert {p.dtype for p in model.parameters()} == {getattr(torch, src["model"]["dtype"])}
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["merge"]["inputs"][0]["run_dir"] == str(runs["sub"].resolve())
    # the same merge again: the completed directory is returned, not rebuilt
    again_dir, again = merge_runs([runs["sub"]], MergeConfig(method="soup", save=True, out_dir=str(tmp_path)))
    assert again_dir == run_dir and again["finished_at"] == result["finished_at"]


def test_full_and_adapter_paths_agree_on_the_same_delta(runs, tmp_path):
    """The LoRA run, and a copy of it whose export is the adapter folded into whole weights: task arithmetic of
    either is the same model (to float rounding), and both differ from the base."""
    from peft import PeftModel

    from ftlab.config.files import load_run_config
    from ftlab.models.loading import load_model, load_tokenizer
    from ftlab.post.variants import folded_state_dict

    lora = runs["lora"]
    folded = tmp_path / "lora_folded"
    shutil.copytree(lora, folded, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = load_run_config(lora)
    tok = load_tokenizer(cfg.model)
    base_model = load_model(cfg.model, tok)
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    peft_model = PeftModel.from_pretrained(base_model, str(lora / "checkpoints" / "final"))
    inner = peft_model.get_base_model()
    inner.save_pretrained(folded / "checkpoints" / "final", state_dict=folded_state_dict(inner),
                          safe_serialization=True)
    a_dir, _ = merge_runs([lora], MergeConfig(method="task_arithmetic", save=True, out_dir=str(tmp_path / "a")))
    b_dir, _ = merge_runs([folded], MergeConfig(method="task_arithmetic", save=True, out_dir=str(tmp_path / "b")))
    a, b = _saved(a_dir), _saved(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert any(not torch.equal(a[k], base[k]) for k in a if k in base)


def test_runs_of_different_bases_are_refused_naming_the_difference(runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs["rot1"], other, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["model"]["world"]["hidden_size"] = 48
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(MergeRefused, match=r"model\.world\.hidden_size: 32 .* vs 48"):
        merge_runs([runs["sub"], other], MergeConfig(method="ties", out_dir=str(tmp_path)))


def test_two_targets_merge_into_a_run_the_report_reads(runs, tmp_path):
    """TIES over a synth_sub and a synth_rot1 run through the CLI: both targets are targets of the merge, the world's
    skills its forgetting suite, and ftlab report's loader reads the directory like a run's."""
    import json

    from ftlab.cli import main
    from ftlab.report.runs import load_run

    assert main(["merge", str(runs["sub"]), str(runs["rot1"]), "method=ties", "density=0.5",
                 f"out_dir={tmp_path}"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    roles = {k: v["role"] for k, v in result["tasks"].items()}
    assert roles["synth_sub"] == roles["synth_rot1"] == "target"
    assert {k for k, r in roles.items() if r == "forget"} >= {"synth_add", "synth_ppl"}
    assert result["summary"]["n_target"] == 2 and result["merge"]["method"] == "ties"
    assert result["validation"]["summary"]["n_target"] == 2
    run = load_run(run_dir)
    assert run.status == "completed" and run.config["method"]["name"] == "merge_ties"
    assert main(["merge", str(runs["sub"]), "method=ties", "densty=0.5"]) == 2


def test_greedy_soup_selects_on_validation(runs, tmp_path):
    run_dir, result = merge_runs([runs["sub"], runs["rot1"]], MergeConfig(method="greedy_soup", out_dir=str(tmp_path)))
    g = result["merge"]["greedy"]
    assert g["order"] == sorted(range(2), key=lambda i: -g["own_scores"][i])
    best = g["steps"][0]["score"]
    for step in g["steps"][1:]:  # the rule: kept when not worse than the soup so far
        assert step["kept"] == (step["score"] >= best)
        best = max(best, step["score"]) if step["kept"] else best
    assert g["score"] == best
    targets = [v["tuned"] for v in result["validation"]["tasks"].values() if v["role"] == "target"]
    assert sum(targets) / len(targets) == pytest.approx(g["score"])


MEASURE = r'''
import json, sys, threading, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from ftlab.config.post import MergeConfig
from ftlab.post.merge import Merger, read_inputs

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak, stop = [0], [False]
def sample():
    while not stop[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)

inputs = read_inputs([Path(p) for p in sys.argv[1:]])
m = Merger(inputs, MergeConfig(method="ties"), "cpu", keep_base=False)
# transformers may leave the loaded weights mapped from the base's file; writing them would then move them into
# anonymous memory and count the model itself as growth: make them anonymous first
with torch.no_grad():
    for p in m.model.parameters():
        p.data = p.data.clone()
loaded = anon()
peak[0] = loaded
t = threading.Thread(target=sample); t.start()
m.build()
stop[0] = True; t.join()
print(json.dumps({"loaded": loaded, "peak": max(peak[0], anon()),
                  "model": sum(p.numel() * p.element_size() for p in m.model.parameters())}))
'''


def test_merging_streams_one_tensor_at_a_time(tmp_path, ftlab_cache):
    """Three full-weight runs of a 160 MB model (32 matrices of 2 MB at most) merged with TIES: while the merged weights
    are built, the process's anonymous memory (sampled every ms, in a fresh process) grows by far less than one more
    model over the loaded base (measured: ~40 MB, the per-parameter temporaries of three runs, whatever the depth):
    the runs' tensors are read one parameter at a time, never a whole model."""
    import os
    import subprocess
    import sys

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from ftlab.rundir.record import RunRecord

    model_dir = tmp_path / "model"
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [chr(c) for c in range(32, 127)])}
    ct = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    ct.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    ct.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=ct, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(model_dir)
    cfg = LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=1024, num_hidden_layers=16,
                      num_attention_heads=8, num_key_value_heads=8, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(model_dir)
    (run_cfg,) = check([f"model.name_or_path={model_dir}", "data=gsm8k", "eval=target", "method=full",
                        "model.max_length=64"])
    dirs = []
    for i in range(3):
        d = tmp_path / f"run{i}"
        prepare_run_dir(d, run_cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        model.save_pretrained(d / "checkpoints" / "final")
        RunRecord(d).update(status="completed", encoding={"max_length": 64, "prompt_format": "plain"})
        dirs.append(str(d))
    del model
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEASURE, *dirs], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["model"] > 150e6
    assert m["peak"] - m["loaded"] < 0.4 * m["model"], m


def test_lines_on_the_merged_delta_scales_by_depth(runs, tmp_path):
    """lines_alpha=0, lines_beta=1 on a task-arithmetic merge of one run: the first block and everything outside the
    blocks keep the base, the last block gets the run's whole update."""
    from ftlab.config.files import load_run_config
    from ftlab.models.loading import load_model, load_tokenizer

    run_dir, _ = merge_runs([runs["sub"]], MergeConfig(method="task_arithmetic", lines_alpha=0.0, lines_beta=1.0,
                                                       save=True, out_dir=str(tmp_path)))
    cfg = load_run_config(runs["sub"])
    base = load_model(cfg.model, load_tokenizer(cfg.model)).state_dict()
    merged, tuned = _saved(run_dir), _final(runs["sub"])
    last = cfg.model.world.num_layers - 1
    changed_last = [k for k in merged if k.startswith(f"model.layers.{last}.")]
    assert changed_last and all(torch.allclose(merged[k], tuned[k], atol=1e-6) for k in changed_last)
    for k in merged:
        if k.startswith("model.layers.0.") or not k.startswith("model.layers."):
            assert torch.equal(merged[k], base[k]), k
    assert any(not torch.equal(merged[k], base[k]) for k in changed_last)
