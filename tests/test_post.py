"""After training (issue 16): post-training variants of a run (post=interp, post=lines) on the small world, and the
merging formulas on small tensors with known answers."""

import json
import math

import pytest
import torch
from conftest import FAST

from ftlab.cli.run import check
from ftlab.config.files import load_run_config
from ftlab.pipeline import run_from_dir
from ftlab.post import formulas as F
from ftlab.rundir.layout import prepare_run_dir

ONE = ["hw.num_threads=1"]


def _run(root, name, overrides):
    (cfg,) = check(FAST + ONE + list(overrides))
    run_dir = root / name
    prepare_run_dir(run_dir, cfg)
    return run_dir, run_from_dir(run_dir, progress=False)


def _records(run_dir, stage):
    out = {}
    for f in sorted((run_dir / "records" / stage).glob("*.jsonl")):
        out[f.stem] = [json.loads(line) for line in f.read_text().splitlines()]
    return out


def _variant(result, name):
    (v,) = [v for v in result["variants"] if v["name"] == name]
    return v


@pytest.fixture(scope="module", params=["full", "lora"])
def interp_run(request, tmp_path_factory, ftlab_cache, one_thread):
    root = tmp_path_factory.mktemp(f"post_{request.param}")
    return request.param, *_run(root, request.param, [f"method={request.param}", "post=interp",
                                                       "post.alphas=[0,0.5,1]"])


def test_interp_endpoints_are_the_base_and_the_tuned_model_exactly(interp_run):
    """alpha=0 scores item for item as the base, alpha=1 as the tuned model (records equal, not just the means);
    alpha=0.5 lies elsewhere on at least one task or item (the variant really changes the weights)."""
    method, run_dir, result = interp_run
    assert result["status"] == "completed" and not result.get("post_error")
    names = [v["name"] for v in result["variants"]]
    assert names == ["interp_a0", "interp_a0.5", "interp_a1"]
    assert _records(run_dir, "variant_interp_a0") == _records(run_dir, "base")
    assert _records(run_dir, "variant_interp_a1") == _records(run_dir, "tuned")
    for name, task in result["tasks"].items():
        assert _variant(result, "interp_a0")["tasks"][name]["tuned"] == task["base"]
        assert _variant(result, "interp_a1")["tasks"][name]["tuned"] == task["tuned"]
    assert _variant(result, "interp_a1")["gain"] == result["summary"]["gain"]
    assert _variant(result, "interp_a0")["gain"] == 0
    mid = _records(run_dir, "variant_interp_a0.5")
    assert mid != _records(run_dir, "base") and mid != _records(run_dir, "tuned")


def test_weights_at_the_endpoints_and_lines_identity(interp_run):
    """On the weights themselves: factor 0 is the base bit for bit, factor 1 the tuned export bit for bit, LiNeS with
    alpha=1, beta=0 is the identity, and LiNeS scales the first block by alpha and the last by alpha + beta."""
    from ftlab.models.loading import load_model, load_tokenizer
    from ftlab.post.variants import ScaledModel, factor_of

    method, run_dir, result = interp_run
    cfg = load_run_config(run_dir)
    tok = load_tokenizer(cfg.model)
    base = {n: p.detach().clone() for n, p in load_model(cfg.model, tok).named_parameters()}
    s = ScaledModel(cfg.model, tok, run_dir, "cpu")
    if method == "full":
        tuned = {n: s.weights.tuned(n, base[n]) for n in base}
        assert any(not torch.equal(tuned[n], base[n]) for n in base)
        s.set(lambda b: 0.0)
        assert all(torch.equal(p, base[n]) for n, p in s.model.named_parameters())
        s.set(factor_of({"kind": "lines", "params": {"alpha": 1.0, "beta": 0.0}}, s.n_blocks))
        assert all(torch.equal(p, tuned[n]) for n, p in s.model.named_parameters())
        s.set(factor_of({"kind": "lines", "params": {"alpha": 0.25, "beta": 0.5}}, s.n_blocks))
        first, last = f"{s.prefix}.0.mlp.down_proj.weight", f"{s.prefix}.{s.n_blocks - 1}.mlp.down_proj.weight"
        got = dict(s.model.named_parameters())
        for n, f in ((first, 0.25), (last, 0.75), ("model.embed_tokens.weight", 0.25)):
            torch.testing.assert_close(got[n] - base[n], f * (tuned[n] - base[n]), rtol=1e-5, atol=1e-6)
    else:
        s0 = {id(m): sc for _, m, _, sc in s._lora}
        s.set(factor_of({"kind": "lines", "params": {"alpha": 0.25, "beta": 0.5}}, s.n_blocks))
        for name, m, a, _ in s._lora:
            block = int(name.split(f"{s.prefix}.")[1].split(".")[0])
            want = 0.25 + 0.5 * block / (s.n_blocks - 1)
            assert m.scaling[a] == s0[id(m)] * want
        s.set(factor_of({"kind": "lines", "params": {"alpha": 1.0, "beta": 0.0}}, s.n_blocks))
        assert all(m.scaling[a] == s0[id(m)] for _, m, a, _ in s._lora)


def test_another_post_on_a_completed_run_evaluates_only_the_new_variants(interp_run, tmp_path):
    """post is outside the run's identity: the same directory takes post=lines, no training happens (the curve and
    the tuned records are untouched), the old variants stay and LiNeS(1, 0) scores as the tuned model."""
    method, run_dir, result = interp_run
    curve_before = (run_dir / "metrics.jsonl").read_text()
    a0_before = (run_dir / "records" / "variant_interp_a0").stat().st_mtime_ns
    (cfg,) = check(FAST + ONE + [f"method={method}", "post=lines", "post.alphas=[1,0.5]", "post.beta=0"])
    prepare_run_dir(run_dir, cfg)  # the same directory: post does not change its name
    again = run_from_dir(run_dir, progress=False)
    assert [v["name"] for v in again["variants"]] == ["interp_a0", "interp_a0.5", "interp_a1", "lines_a1_b0",
                                                       "lines_a0.5_b0"]
    assert (run_dir / "metrics.jsonl").read_text() == curve_before
    assert (run_dir / "records" / "variant_interp_a0").stat().st_mtime_ns == a0_before
    assert again["started_at"] == result["started_at"]
    assert _records(run_dir, "variant_lines_a1_b0") == _records(run_dir, "tuned")
    # once more: nothing left to do, the record comes back as it is
    assert run_from_dir(run_dir, progress=False)["variants"] == again["variants"]


def test_post_is_outside_the_run_name():
    from ftlab.config.schema import to_container
    from ftlab.rundir.identity import run_name

    plain, = check(FAST + ONE + ["method=full"])
    lines, = check(FAST + ONE + ["method=full", "post=lines"])
    assert run_name(to_container(plain)) == run_name(to_container(lines))


@pytest.mark.parametrize("args, key", [
    (["method=full", "post=interp", "post.alphas=[]"], "post.alphas"),
    (["method=full", "post=interp", "post.alphas=[0.5,0.5]"], "post.alphas"),
    (["method=full", "post=interp", "post.beta=0.5"], "post.beta"),
    (["method=full", "post.alphas=[0.5]"], "post.alphas"),
    (["method=dora", "post=lines"], "post: method=dora"),
])
def test_bad_post_config_is_refused_naming_the_key(args, key):
    from ftlab.config.registry import ConfigError

    with pytest.raises(ConfigError, match=key):
        check(FAST + args)


# ------------------------------------------------------------------------------------------------ formulas
def test_ties_trim_keeps_ties_at_the_threshold():
    d = torch.tensor([1.0, -2.0, 2.0, 3.0])
    # density 0.25 keeps int(4 * 0.25) = 1: the largest
    assert torch.equal(F.trim(d, 0.25), torch.tensor([0.0, 0.0, 0.0, 3.0]))
    # density 0.5 keeps 2 by count, but |-2| ties with |2| at the threshold: both stay
    assert torch.equal(F.trim(d, 0.5), torch.tensor([0.0, -2.0, 2.0, 3.0]))
    assert torch.equal(F.trim(torch.tensor([4.0, -1.0, 3.0, 2.0]), 0.5), torch.tensor([4.0, 0.0, 3.0, 0.0]))
    assert torch.equal(F.trim(d, 1.0), d)


def test_ties_sign_election_and_disjoint_mean():
    a = torch.tensor([3.0, -1.0, 2.0, 1.0, -4.0])
    b = torch.tensor([-1.0, -2.0, -3.0, 1.0, 0.0])
    c = torch.tensor([-1.0, 5.0, 1.0, -1.0, 0.0])
    merged = F.ties([a, b, c], density=1.0, sign="total")
    # total: sums 1, 2, 0, 1, -4 -> signs +, +, (0 -> majority of the elected signs: +), +, -
    torch.testing.assert_close(merged, torch.tensor([3.0, 5.0, 1.5, 1.0, -4.0]))
    freq = F.ties([a, b, c], density=1.0, sign="frequency")
    # frequency: sign counts +1-1-1 = -1, -1-1+1 = -1, +1-1+1 = +1, +1+1-1 = +1, -1 -> -, -, +, +, -
    torch.testing.assert_close(freq, torch.tensor([-1.0, -1.5, 1.5, 1.0, -4.0]))


def test_dare_rescale_keeps_the_expectation():
    """Over many independent draws the mean of dare(x) is x (each entry within 5 standard errors), and the kept
    share is 1 - drop; without rescale the mean shrinks to (1 - drop) * x."""
    x = torch.linspace(-1, 1, 64)
    drop, n = 0.9, 4000
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([F.dare(x, drop, True, g) for _ in range(n)])
    se = x.abs() * math.sqrt(drop / (1 - drop)) / math.sqrt(n)
    assert ((draws.mean(0) - x).abs() <= 5 * se + 1e-7).all()
    assert abs((draws != 0).float().mean().item() - (1 - drop)) < 0.01
    plain = torch.stack([F.dare(x, drop, False, g) for _ in range(n)]).mean(0)
    assert ((plain - (1 - drop) * x).abs() <= 5 * se * (1 - drop) + 1e-7).all()


def test_breadcrumbs_masks_outliers_and_the_smallest():
    d = torch.tensor([0.1, -5.0, 0.3, 0.2, -0.4, 0.5, 0.6, -0.7, 0.8, 0.9])
    # density 0.5 keeps 5 of 10; gamma 0.1 drops the 1 largest (-5); the 4 smallest go too
    m = F.breadcrumbs_mask(d, density=0.5, gamma=0.1)
    assert m.tolist() == [False, False, False, False, False, True, True, True, True, True]
    torch.testing.assert_close(F.breadcrumbs([d, d], 0.5, 0.1), 2 * d * m)
    # equal magnitudes: position decides (a stable sort), so the mask is reproducible
    assert F.breadcrumbs_mask(torch.tensor([1.0, -1.0, 1.0, -1.0]), 0.5, 0.0).tolist() == [False, False, True, True]


def test_greedy_soup_order_and_selection():
    """Ingredients tried best-first by their own score; one is kept when the soup does not get worse (>=)."""
    soups = {(2,): 80.0, (2, 0): 82.0, (2, 0, 3): 81.0, (2, 0, 1): 82.0}
    picked = F.greedy_soup_order([70.0, 60.0, 90.0, 65.0], lambda idx: soups[tuple(idx)])
    assert picked["order"] == [2, 0, 3, 1]
    assert picked["chosen"] == [2, 0, 1] and picked["score"] == 82.0
    assert [s["kept"] for s in picked["steps"]] == [True, True, False, True]


def test_a_merge_of_one_equals_it():
    t = torch.randn(5, 3)
    assert torch.equal(F.soup([t]), t)
    assert torch.equal(F.task_arithmetic([t]), t)
    assert torch.equal(F.ties([t], density=1.0), t)
    assert torch.equal(F.dare(t, 0.0), t)


def test_a_saved_variant_is_an_hf_model_of_the_base_names_and_dtypes(interp_run, tmp_path):
    """post.save's directory (here one variant, alpha 0.5): transformers loads it; its tensors have the base's names
    and dtypes, and it computes what the evaluated model computed."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ftlab.models.loading import load_model, load_tokenizer
    from ftlab.post.variants import ScaledModel

    method, run_dir, _ = interp_run
    cfg = load_run_config(run_dir)
    tok = load_tokenizer(cfg.model)
    base_sd = load_model(cfg.model, tok).state_dict()
    s = ScaledModel(cfg.model, tok, run_dir, "cpu")
    s.set(lambda block: 0.5)
    s.save(tmp_path / "v", tok)
    saved = load_file(str(tmp_path / "v" / "model.safetensors"))
    assert set(saved) <= set(base_sd) and {k: v.dtype for k, v in saved.items()} == \
        {k: base_sd[k].dtype for k in saved}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "v").eval()
    ids = torch.tensor([tok("1+2=")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, s.model(ids).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(loaded(ids).logits, load_model(cfg.model, tok)(ids).logits)


def test_a_failed_post_step_leaves_the_run_completed_and_says_why(interp_run, tmp_path):
    """Without its export a completed run cannot make variants: the command fails naming checkpoints/final, the
    record keeps status completed and its scores, and post_error says why."""
    import shutil

    from ftlab.pipeline import RunFailed

    method, run_dir, result = interp_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    (cfg,) = check(FAST + ONE + [f"method={method}", "post=interp", "post.alphas=[0.3]"])
    prepare_run_dir(copy, cfg)
    with pytest.raises(RunFailed, match="checkpoints/final"):
        run_from_dir(copy, progress=False)
    after = json.loads((copy / "result.json").read_text())
    assert after["status"] == "completed" and after["tasks"] == result["tasks"]
    assert "checkpoints/final" in after["post_error"]
