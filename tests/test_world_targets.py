"""The world's fine-tuning targets at known distances: the far target `depth`, the structural table NEIGHBOURS,
forgetting by distance (near / far) in the run summary, and the gradient-similarity measure behind the table."""

from __future__ import annotations

import math

import pytest

from ftlab.config.names import PRETRAIN_SKILLS, TARGET_SKILLS
from ftlab.eval.metrics import forgetting_by_distance, summarize, task_entry
from ftlab.world import skills as sk


def _reference_depth(s: str) -> int:
    # An independent reading: each pass deletes every pair with nothing inside ("()"), i.e. one layer of the
    # nesting tree from the leaves up; the number of passes to empty the string is the height of the tree.
    passes = 0
    while s:
        nxt = s.replace("()", "")
        assert nxt != s, "unbalanced"
        s, passes = nxt, passes + 1
    return passes


def _prefix_depths(s: str) -> list[int]:
    d, out = 0, []
    for c in s:
        d += 1 if c == "(" else -1
        out.append(d)
    return out


def test_depth_examples_are_balanced_bracket_strings_with_their_depth():
    exs = sk.make_examples("depth", "train", 300) + sk.make_examples("depth", "test", 100)
    depths = set()
    for e in exs:
        assert e["prompt"].startswith("depth:") and e["prompt"].endswith("=")
        p = e["prompt"][len("depth:"):-1]
        assert set(p) <= {"(", ")"} and 6 <= len(p) <= 18
        assert min(_prefix_depths(p)) >= 0 and _prefix_depths(p)[-1] == 0, p  # balanced
        assert e["response"] == str(_reference_depth(p)), p
        depths.add(int(e["response"]))
    assert {1, 2, 3, 4, 5} <= depths  # not one constant answer
    # hand-checked cases
    assert sk.SKILLS["depth"].answer("()()()") == "1"
    assert sk.SKILLS["depth"].answer("(()(()))") == "3"
    assert sk.SKILLS["depth"].answer("((((((((" + "))))))))") == "8"


def test_depth_splits_use_the_shared_hash_and_are_disjoint():
    payloads = {split: {e["prompt"][6:-1] for e in sk.make_examples("depth", split, 80, seed=3)}
                for split in sk.SPLITS}
    assert not (payloads["train"] & payloads["test"]) and not (payloads["train"] & payloads["validation"])
    assert not (payloads["validation"] & payloads["test"])
    for split, ps in payloads.items():
        assert all(sk.payload_split("depth", p) == split == sk._split_of(p) for p in ps)
    assert sk.make_examples("depth", "test", 20, seed=3) == sk.make_examples("depth", "test", 20, seed=3)
    assert sk.make_examples("depth", "test", 20, seed=3) != sk.make_examples("depth", "test", 20, seed=4)


def test_depth_is_a_target_never_pretrained_and_its_characters_tokenize():
    from ftlab.world.tokenizer import build_tokenizer

    assert "depth" in TARGET_SKILLS and "depth" not in PRETRAIN_SKILLS and "depth" not in sk.DEFAULT_SKILLS
    assert "depth" in sk.SKILL_DOCS
    with pytest.raises(ValueError, match="not pretraining skills"):
        sk.pretrain_text("train", 3, skills=["depth"])
    tok = build_tokenizer()
    ex = sk.make_examples("depth", "test", 5)[0]
    ids = tok(ex["prompt"] + ex["response"])["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == ex["prompt"] + ex["response"]


def test_neighbours_table_covers_every_target_with_pretraining_skills():
    assert set(sk.NEIGHBOURS) == set(TARGET_SKILLS)
    for t, near in sk.NEIGHBOURS.items():
        assert set(near) <= set(PRETRAIN_SKILLS) and t not in near
    assert sk.NEIGHBOURS["depth"] == ()  # the far target: near nothing
    assert all(sk.NEIGHBOURS[t] for t in TARGET_SKILLS if t != "depth")


# ----------------------------------------------------------------------------------------- forgetting by distance
def _table(drops: dict[str, float], extra: dict | None = None) -> dict:
    base = 90.0
    t = {f"synth_{s}": task_entry("forget", "exact_match", True, "points", base, base - d, 100) for s, d in drops.items()}
    t["data"] = task_entry("target", "exact_match", True, "points", 0.0, 60.0, 100)
    t["synth_ppl"] = task_entry("forget", "perplexity", False, "perplexity", 1.5, 9.0, 100)
    t.update(extra or {})
    return t


def test_forgetting_by_distance_means_over_near_and_far_skills():
    drops = {"add": 30.0, "succ": 10.0, "rev": 4.0, "copy": -2.0, "sort": 1.0, "cnt": 3.0}
    d = forgetting_by_distance(_table(drops), "sub")
    assert d["near"] == pytest.approx((30.0 + 10.0) / 2) and d["n_near"] == 2
    assert d["far"] == pytest.approx((4.0 - 2.0 + 1.0 + 3.0) / 4) and d["n_far"] == 4
    # the same table read for another target splits it the other way
    r = forgetting_by_distance(_table(drops), "rot1")
    assert r["near"] == pytest.approx((4.0 - 2.0 + 1.0) / 3) and r["far"] == pytest.approx((30.0 + 10.0 + 3.0) / 3)
    # the far target: everything is far
    f = forgetting_by_distance(_table(drops), "depth")
    assert f["near"] is None and f["far"] == pytest.approx(sum(drops.values()) / 6)


def test_forgetting_by_distance_ignores_what_is_not_a_pretraining_skill():
    drops = {"add": 20.0, "rev": 5.0}
    extra = {"synth_sub": task_entry("forget", "exact_match", True, "points", 50.0, 0.0, 10),  # the target itself
             "arc_easy": task_entry("forget", "acc", True, "points", 50.0, 10.0, 10),  # not the world
             "synth_nope": task_entry("forget", "exact_match", True, "points", 50.0, 0.0, 10)}
    d = forgetting_by_distance(_table(drops, extra), "sub")
    assert (d["near"], d["far"], d["n_near"], d["n_far"]) == (20.0, 5.0, 1, 1)
    # lower-is-better points count as a drop the right way round
    low = {"synth_cnt": task_entry("forget", "error", False, "points", 10.0, 25.0, 10)}
    assert forgetting_by_distance(low, "sub")["far"] == pytest.approx(15.0)


def test_forgetting_by_distance_none_outside_the_world_and_in_the_summary():
    t = _table({"add": 8.0, "cnt": 2.0})
    assert forgetting_by_distance(t, None)["near"] is None and forgetting_by_distance(t, "gsm8k")["far"] is None
    assert forgetting_by_distance({}, "sub") == {"near": None, "far": None, "n_near": 0, "n_far": 0}
    s = summarize(t, "sub")
    assert (s["forgetting_near"], s["forgetting_far"]) == (8.0, 2.0)
    assert s["forgetting"] == pytest.approx(5.0)  # the plain mean is unchanged by the split
    assert "forgetting_near" not in summarize(t) and "forgetting_far" not in summarize(t)  # not a world run
    # a custom table (the function is pure: no world import needed to test it)
    assert forgetting_by_distance(t, "x", neighbours={"x": ("cnt",)})["near"] == 2.0


def test_world_target_of_composed_configs():
    from ftlab.cli.run import check
    from ftlab.pipeline import world_target

    (run,) = check(["data=synth_depth"])
    assert run.data.skill == "depth" and run.data.source == "synth"
    assert world_target(run) == "depth"
    assert world_target(check(["data=synth_sub"])[0]) == "sub"


# ------------------------------------------------------------------------------------------- gradient similarity
@pytest.fixture(scope="module")
def tiny():
    import torch

    from ftlab.world.model import build_model
    from ftlab.world.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model({"hidden_size": 32, "num_heads": 4, "num_layers": 2, "intermediate_size": 64, "seed": 1},
                        tok)
    return model.eval(), tok


def test_mean_gradient_is_batch_independent_and_leaves_the_model_alone(tiny):
    import torch

    from ftlab.world.distance import mean_gradient

    model, tok = tiny
    exs = sk.make_examples("add", "train", 24) + sk.make_examples("rev", "train", 16)
    g1 = mean_gradient(model, tok, exs, batch_size=40)
    g2 = mean_gradient(model, tok, exs, batch_size=7)  # uneven batches, different padding
    assert g1.shape == (sum(p.numel() for p in model.parameters()),)
    assert torch.isfinite(g1).all() and g1.norm() > 0
    assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters()) and not model.training
    with pytest.raises(ValueError, match="no examples"):
        mean_gradient(model, tok, [])


def test_gradient_similarity_is_a_symmetric_cosine_matrix(tiny):
    from ftlab.world.distance import gradient_similarity, skill_similarity

    model, tok = tiny
    groups = {s: sk.make_examples(s, "train", 16) for s in ("sub", "add", "depth")}
    groups["add_again"] = groups["add"]
    sim = gradient_similarity(model, tok, groups)
    for a in groups:
        assert sim[a][a] == pytest.approx(1.0)
        for b in groups:
            assert math.isfinite(sim[a][b]) and -1.0 - 1e-9 <= sim[a][b] <= 1.0 + 1e-9
            assert sim[a][b] == pytest.approx(sim[b][a])
    assert sim["add"]["add_again"] == pytest.approx(1.0)  # same examples, same gradient
    assert sim["add"]["depth"] < 1.0 - 1e-6  # different skills are not the same direction
    t = skill_similarity(model, tok, ["depth"], ["add", "rev"], n=8)
    assert set(t) == {"depth"} and set(t["depth"]) == {"add", "rev"}
