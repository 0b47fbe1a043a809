"""Weight diagnostics on constructed matrices whose answer is known: planted intruders, planted update ranks."""

import math

import pytest
import torch

from ftlab.eval.diagnostics import (
    effective_rank,
    effective_weights,
    energy_rank,
    intruder_dimensions,
    parse_name,
    update_profile,
    weight_report,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices (conftest.py)


def spectrum_matrix(m, n, sigma, seed=0):
    """U diag(sigma) Vᵀ with random orthonormal U, V: the singular values are exactly `sigma`."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    r = len(sigma)
    return u[:, :r] @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v[:, :r].T


def unit(n, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm()


@pytest.mark.parametrize("shape", [(64, 64), (96, 48), (48, 96)])
def test_a_planted_rank1_intruder_is_found_at_the_top(shape):
    m, n = shape
    base = spectrum_matrix(m, n, torch.linspace(10, 1, min(m, n)).tolist())
    tuned = base + 20.0 * torch.outer(unit(m, 1), unit(n, 2))  # a new direction, stronger than any base one
    res = intruder_dimensions(base, tuned, ks=(1, 10), epsilons=(0.5, 0.9))
    assert res["counts"][(10, 0.5)] == 1 and res["counts"][(1, 0.5)] == 1 and res["counts"][(10, 0.9)] >= 1
    assert [i["rank"] for i in res["intruders"]] == [0] and res["intruders"][0]["sigma"] > 15
    right = intruder_dimensions(base, tuned, ks=(10,), epsilons=(0.5,), side="right")
    assert right["counts"][(10, 0.5)] == 1


def test_a_weak_intruder_counts_only_once_k_reaches_it():
    base = spectrum_matrix(64, 64, torch.linspace(10, 1, 64).tolist())
    tuned = base + 5.5 * torch.outer(unit(64, 3), unit(64, 4))  # lands around the middle of the top spectrum
    res = intruder_dimensions(base, tuned, ks=(1, 20), epsilons=(0.5,))
    (intr,) = res["intruders"]
    assert intr["rank"] > 0 and res["counts"][(1, 0.5)] == 0 and res["counts"][(20, 0.5)] == 1


def test_no_intruder_in_an_unchanged_or_slightly_perturbed_matrix():
    base = spectrum_matrix(64, 32, torch.linspace(10, 1, 32).tolist())
    same = intruder_dimensions(base, base.clone(), ks=(10, 32), epsilons=(0.5, 0.9))
    assert all(v == 0 for v in same["counts"].values())
    assert min(same["max_cos"]) > 0.999
    noise = 1e-3 * torch.randn(64, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    near = intruder_dimensions(base, base + noise, ks=(10,), epsilons=(0.5, 0.9))
    assert all(v == 0 for v in near["counts"].values())


@pytest.mark.parametrize("r", [1, 4, 8])
def test_effective_rank_of_a_planted_rank_r_update(r):
    base = spectrum_matrix(64, 48, torch.linspace(5, 1, 48).tolist(), seed=1)
    delta = spectrum_matrix(64, 48, [0.3] * r, seed=2)  # r equal singular values
    prof = update_profile(base, base + delta)
    assert prof["erank"] == pytest.approx(r, rel=1e-6)
    assert prof["rank90"] == math.ceil(0.9 * r - 1e-9)
    assert prof["rel_update"] == pytest.approx(0.3 * math.sqrt(r) / float(base.norm()), rel=1e-9)
    assert prof["changed_frac"] == 1.0
    # unequal spectrum: the 90% rank follows the energy
    skewed = spectrum_matrix(64, 48, [3.0, 1.0, 0.1, 0.1], seed=3)
    assert energy_rank(torch.linalg.svdvals(skewed)) == 2
    assert 1 < effective_rank(torch.linalg.svdvals(skewed)) < 4


def test_zero_update_profile():
    base = spectrum_matrix(16, 16, [1.0] * 16)
    prof = update_profile(base, base.clone())
    assert prof["rel_update"] == 0 and prof["erank"] == 0 and prof["rank90"] == 0 and prof["changed_frac"] == 0


def test_parse_name():
    assert parse_name("model.layers.3.self_attn.q_proj.weight") == (3, "q_proj")
    assert parse_name("model.layers.12.mlp.down_proj.weight") == (12, "down_proj")
    assert parse_name("transformer.h.0.attn.c_attn.weight") == (0, "c_attn")
    assert parse_name("lm_head.weight") == (None, "lm_head")


def test_weight_report_on_a_model_with_a_planted_lora_update():
    """A LoRA adapter with a rank-1 update in one matrix: the report finds that matrix, its rank and the intruder."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    base = effective_weights(model)
    assert "model.layers.0.self_attn.q_proj.weight" in base and not any("embed" in k for k in base)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    target = peft.base_model.model.model.layers[1].self_attn.q_proj
    with torch.no_grad():  # B·A = 10 · u vᵀ (rank 1), only in layer 1's q_proj
        target.lora_A["default"].weight.zero_()
        target.lora_A["default"].weight[0] = unit(32, 7).float()
        target.lora_B["default"].weight.zero_()
        target.lora_B["default"].weight[:, 0] = 10 * unit(32, 8).float()
    tuned = effective_weights(peft)
    assert set(tuned) == set(base)
    assert "lora_A" in str(list(peft.state_dict())) and peft.base_model.model.model.layers[1].self_attn.q_proj is target
    rep = weight_report(base, tuned, ks=(1, 10), epsilons=(0.5, 0.9))
    (row,) = rep["matrices"]  # only_changed: every other matrix is identical
    assert row["name"] == "model.layers.1.self_attn.q_proj.weight" and (row["layer"], row["module"]) == (1, "q_proj")
    assert row["rank90"] == 1 and row["erank"] == pytest.approx(1.0, abs=1e-3)
    assert row["intruders"]["k1_eps0.5"] == 1
    s = rep["summary"]
    assert s["n_matrices"] == 14 and s["n_changed"] == 1 and s["intruders"]["k10_eps0.5"] >= 1
    assert s["by_module"]["q_proj"]["intruders"] == row["intruders"]["k1_eps0.5"]
    full = weight_report(base, tuned, ks=(10,), epsilons=(0.5,), only_changed=False)
    assert len(full["matrices"]) == 14
    assert all(r["intruders"]["k10_eps0.5"] == 0 for r in full["matrices"] if r["name"] != row["name"])


# --------------------------------------------------------------------------------------- continual protocol
def test_continual_metrics_on_a_known_accuracy_matrix():
    from ftlab.continual import continual_metrics

    R = [[80, 10, 5],   # after stage a
         [60, 90, 20],  # after stage b: a dropped 20
         [50, 85, 70]]  # after stage c
    m = continual_metrics(R, base=[10, 5, 5], names=["a", "b", "c"])
    assert m["average_accuracy"] == pytest.approx((50 + 85 + 70) / 3)
    assert m["bwt"] == pytest.approx(((50 - 80) + (85 - 90)) / 2)
    assert m["bwt_trace"] == pytest.approx(((50 - 80) + (85 - 90)) / 3)
    assert m["forgetting"] == {"a": 30, "b": 5} and m["forgetting_mean"] == 17.5
    assert m["learning"] == {"a": 70, "b": 85, "c": 65}
    assert m["fwt"] == pytest.approx(((10 - 5) + (20 - 5)) / 2)
    one = continual_metrics([[42.0]])
    assert one["average_accuracy"] == 42 and one["bwt"] is None and one["forgetting"] == {}
    with pytest.raises(ValueError, match="square"):
        continual_metrics([[1, 2], [3]])


# ---------------------------------------------------------------------------------------------------- TuCo
def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                        attn_implementation="eager")).eval()


class _Tok:
    pad_token_id, eos_token_id = 0, 1

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[2] + [3 + (ord(c) % 60) for c in t] for t in texts]}


def test_tuco_is_zero_without_tuning_and_grows_with_the_update():
    import copy

    from ftlab.eval.diagnostics import tuning_contribution

    base = _tiny_llama()
    prompts = ["hello there", "a much longer prompt about nothing", "x"]
    same = tuning_contribution(copy.deepcopy(base), _Tok(), prompts, base_model=base, batch_size=2)
    assert [r["tuco"] for r in same] == [0.0, 0.0, 0.0] and all(r["ptc_norm"] > 0 for r in same)
    small, large = copy.deepcopy(base), copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    for m, scale in ((small, 0.01), (large, 0.3)):
        with torch.no_grad():
            w = m.model.layers[1].mlp.down_proj.weight
            w += scale * torch.randn(w.shape, generator=g)
    t_small = tuning_contribution(small, _Tok(), prompts, base_model=base)
    t_large = tuning_contribution(large, _Tok(), prompts, base_model=base)
    assert all(0 < a["tuco"] < b["tuco"] < 1 for a, b in zip(t_small, t_large))
    # batching (right padding) does not change a prompt's value
    one = tuning_contribution(large, _Tok(), prompts[:1], base_model=base)
    assert one[0]["tuco"] == pytest.approx(t_large[0]["tuco"], rel=1e-5)


def test_tuco_of_a_long_prompt_is_measured_at_its_last_token():
    """A prompt over max_length keeps its LAST max_length tokens (TuCo is read at the last prompt token): its TuCo
    equals that of its last max_length tokens alone, and differs from that of its first max_length tokens."""
    import copy

    from ftlab.eval.diagnostics import tuning_contribution

    class NoBos(_Tok):  # the same ids without the leading BOS: a text that encodes to exactly the kept tokens
        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [ids[1:] for ids in super().__call__(texts)["input_ids"]]}

    base = _tiny_llama()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        w = tuned.model.layers[1].mlp.down_proj.weight
        w += 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    long, n = "the first words differ from the last words of this prompt", 12
    cut = tuning_contribution(tuned, _Tok(), [long, "short"], base_model=base, max_length=n)[0]["tuco"]
    last = tuning_contribution(tuned, NoBos(), [long[-n:]], base_model=base)[0]["tuco"]
    first = tuning_contribution(tuned, _Tok(), [long[:n - 1]], base_model=base)[0]["tuco"]
    assert cut == pytest.approx(last, rel=1e-5)
    assert first != pytest.approx(last, rel=1e-3)


def test_tuco_decomposition_is_exact_and_peft_needs_no_base_copy():
    from peft import LoraConfig, get_peft_model

    from ftlab.eval.diagnostics import tuning_contribution

    peft = get_peft_model(_tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    last_out = []
    handle = peft.base_model.model.model.layers[-1].register_forward_hook(lambda m, a, o: last_out.append(o))
    try:
        got = tuning_contribution(peft, _Tok(), ["decompose me"], return_vectors=True)[0]
    finally:
        handle.remove()
    assert 0 < got["tuco"] < 1
    with peft.disable_adapter():
        assert tuning_contribution(peft, _Tok(), ["decompose me"])[0]["tuco"] == 0.0  # no tuning at all
    # exact: the last layer's output = first layer's input + ΣPTC + ΣFTC (tuned forward, last token)
    x_last = (last_out[0][0] if isinstance(last_out[0], tuple) else last_out[0])[0, -1].double()
    assert torch.allclose(got["x0"] + got["ptc"] + got["ftc"], x_last, atol=1e-5)
