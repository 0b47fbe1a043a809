"""The shared method test matrix: one row per `method=` option (ROWS below), on a tiny Llama (hidden 32, 2 blocks,
vocab 64).

Each row checks, through the real config (Hydra compose + schema), `Method.prepare` and the one training loop
(`ftlab.train.loop.train`):
- which parameters train: names and count match the method's definition (the row's `expect`), nothing else moves;
- it trains: the loss falls over a few steps;
- export: the saved result, reloaded onto a freshly built ORIGINAL base, gives the in-memory model's logits
  (max |diff| <= RELOAD_ATOL = 1e-5); for adapters merge-and-unload gives them too (<= MERGE_ATOL = 1e-4).
  Inits that rewrite base weights (PiSSA, OLoRA, CorDA, LoRA-GA) are checked to have rewritten them, so the
  reload test is a real test of the weight conversion;
- its range checks: each of the row's `refused` overrides is refused, naming the key.
Every registered method has a row, a YAML in conf/method/ and a torch-free module (checked below). Adding a method
adds one row: every parametrized test reads its membership from ROWS.
Then: the regularisers (zero at step 0, growing as the model moves), LISA's re-sampling, HFT's draw, freeze's
layer-wise LR decay, prompt tuning's cached decoding, and one end-to-end `ftlab.pipeline` run.
"""

from __future__ import annotations

import functools
import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from ftlab.cli.run import check
from ftlab.config.registry import ConfigError
from ftlab.config.schema import TrainConfig
from ftlab.methods import METHODS, MethodContext, build_method
from ftlab.train.batches import Batches, collate, encode_example
from ftlab.train.loop import LoopSettings, train

ROOT = Path(__file__).resolve().parents[1]
RELOAD_ATOL = 1e-5
MERGE_ATOL = 1e-4
HIDDEN, INTER, LAYERS, VOCAB = 32, 64, 2, 64
LINEAR = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
          "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}  # (in, out); 2 kv heads of 8
STEPS = 8

# ------------------------------------------------------------------------------------------ tiny model, data
CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 =>"))
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


@functools.lru_cache(maxsize=1)
def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    ct = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    ct.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    ct.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=ct, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def make_model(seed: int = 0):
    """The ORIGINAL base: the same weights every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def make_rows(n: int = 16, seed: int = 0) -> list[dict]:
    """Reverse a 4-letter word: a learnable pattern for a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = "".join(rng.choice("abcdef") for _ in range(4))
        rows.append({"prompt": f"{w}=", "response": w[::-1]})
    return rows


# ------------------------------------------------------------------------------ expected trainable parameters
# Each takes the trained row (`t`: cfg, method, model) and returns {parameter name: numel} that the method's
# definition says train at step 0.
HEAD = ("lm_head.weight", "model.norm.weight")
EMBEDDINGS = ("model.embed_tokens.weight",)


def _sub(mod: str) -> str:
    return "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def _base_params() -> dict[str, int]:
    return {n: p.numel() for n, p in make_model().named_parameters()}


def _block(params: dict[str, int], i: int) -> dict[str, int]:
    return {n: k for n, k in params.items() if n.startswith(f"model.layers.{i}.")}


def every_parameter(t) -> dict[str, int]:
    return _base_params()


def lora_adapters(t, magnitude: bool = False) -> dict[str, int]:
    """A and B of rank r on every target of every block (DoRA: and a magnitude per output feature)."""
    out = {}
    for i in range(LAYERS):
        for mod in t.cfg.target_modules:
            d_in, d_out = LINEAR[mod]
            pre = f"base_model.model.model.layers.{i}.{_sub(mod)}.{mod}"
            out[f"{pre}.lora_A.default.weight"] = t.cfg.r * d_in
            out[f"{pre}.lora_B.default.weight"] = t.cfg.r * d_out
            if magnitude:
                out[f"{pre}.lora_magnitude_vector.default.weight"] = d_out
    return out


def dora_adapters(t) -> dict[str, int]:
    return lora_adapters(t, magnitude=True)


def ia3_vectors(t) -> dict[str, int]:
    """One vector per target: its input size for feedforward modules, its output size for the others."""
    out = {}
    for i in range(LAYERS):
        for mod in t.cfg.target_modules:
            d_in, d_out = LINEAR[mod]
            size = d_in if mod in t.cfg.feedforward_modules else d_out
            out[f"base_model.model.model.layers.{i}.{_sub(mod)}.{mod}.ia3_l.default"] = size
    return out


def soft_prompt(t) -> dict[str, int]:
    return {"peft_model.prompt_encoder.default.embedding.weight": t.cfg.num_virtual_tokens * HIDDEN}


def top_blocks(t) -> dict[str, int]:
    """freeze: the top train_top blocks, the head and final norm (train_head), the embeddings (train_embeddings)."""
    params, c = _base_params(), t.cfg
    out = {n: k for i in range(LAYERS - c.train_top, LAYERS) for n, k in _block(params, i).items()}
    names = (HEAD if c.train_head else ()) + (EMBEDDINGS if c.train_embeddings else ())
    return {**out, **{n: params[n] for n in names}}


def sampled_blocks(t) -> dict[str, int]:
    """LISA, OwLore: embeddings + head + final norm + the gamma blocks of the first draw."""
    params = _base_params()
    active = t.method.history[0][1]
    assert len(active) == t.cfg.gamma
    out = {n: params[n] for n in EMBEDDINGS + HEAD}
    for i in active:
        out.update(_block(params, i))
    return out


def _check_hft_selection(t):
    from ftlab.methods.hft import block_units

    base = make_model()
    names = set(t.trainable0)
    ffn_total = 0
    for i, layer in enumerate(base.model.layers):
        units = block_units(layer)
        assert sorted(units) == ["attn", "mlp", "norm"]
        trained_units = {cat: sorted(u for u in us if f"model.layers.{i}.{u}.weight" in names)
                         for cat, us in units.items()}
        assert len(units["attn"]) == 4 and len(trained_units["attn"]) == 2  # exactly half of q/k/v/o
        assert len(units["norm"]) == 2 and len(trained_units["norm"]) == 1
        assert len(trained_units["mlp"]) in (1, 2)
        ffn_total += len(trained_units["mlp"])
        assert trained_units == t.method.selection[i]
    assert ffn_total == 3  # 2 blocks x 3 FFN matrices: exactly half
    outside = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    assert names & outside == outside  # HFT halves the blocks; embeddings and head train (gucci-j/ssu's reading)
    n_matrices = sum(1 for n in names if n.endswith(".weight") and n.startswith("model.layers."))
    assert n_matrices == 2 * (2 + 1) + 3  # attn 2+2, norms 1+1, ffn 3


def hft_half(t) -> dict[str, int]:
    """Half of each block's attention matrices, FFN matrices and norms (the rules in _check_hft_selection), and the
    embeddings, head and final norm."""
    _check_hft_selection(t)
    base = make_model()
    params = _base_params()
    out = {n: params[n] for n in EMBEDDINGS + HEAD}
    for i, chosen in t.method.selection.items():
        layer = base.model.layers[i]
        for units in chosen.values():
            for u in units:
                for p, w in layer.get_submodule(u).named_parameters(recurse=False):
                    out[f"model.layers.{i}.{u}.{p}"] = w.numel()
    return out


def lift_budget(cfg, mod: str) -> int:
    """LIFT's LoRA-matched budget of a target: (d_in + d_out) * lora_rank entries (at most the whole matrix); with
    `percent`, that share of its entries."""
    d_in, d_out = LINEAR[mod]
    if cfg.percent is not None:
        return round(cfg.percent / 100 * d_in * d_out)
    return min((d_in + d_out) * cfg.lora_rank, d_in * d_out)


def lift_deltas(t) -> dict[str, int]:
    """One delta of lift_budget entries per target linear of every block."""
    return {f"model.layers.{i}.{_sub(mod)}.{mod}.parametrizations.weight.0.delta": lift_budget(t.cfg, mod)
            for i in range(LAYERS) for mod in t.cfg.target_modules}


def ssf_vectors(t) -> dict[str, int]:
    """A scale and a shift per output feature of every target linear, of each block's two norms and of the token
    embedding; a scale (no shift: final_norm_shift false) after the final norm."""
    out = {f"model.layers.{i}.{_sub(mod)}.{mod}.ssf_{k}": LINEAR[mod][1]
           for i in range(LAYERS) for mod in t.cfg.target_modules for k in ("scale", "shift")}
    out.update({f"model.layers.{i}.{norm}.ssf_{k}": HIDDEN for i in range(LAYERS)
                for norm in ("input_layernorm", "post_attention_layernorm") for k in ("scale", "shift")})
    out.update({"model.norm.ssf_scale": HIDDEN, "model.embed_tokens.ssf_scale": HIDDEN,
                "model.embed_tokens.ssf_shift": HIDDEN})
    return out


S2FT_UNITS = {"v": ("v_proj", "kv_heads", 8), "o": ("o_proj", "heads", 8), "u": ("up_proj", "channels", 1),
              "d": ("down_proj", "channels", 1)}  # kind: module, unit, rows/columns per unit (head_dim 8)


def s2ft_deltas(t) -> dict[str, int]:
    """One block per matrix with chosen units: v_proj rows (head_dim per kv head) x d_in, d_out x o_proj columns (per
    query head), up_proj rows x d_in, d_out x down_proj columns (one per channel)."""
    out = {}
    for i, sel in t.method.selection.items():
        for kind, (mod, unit, width) in S2FT_UNITS.items():
            units = sel.get(f"{kind}_{unit}", [])
            if units:
                d_in, d_out = LINEAR[mod]
                out[f"model.layers.{i}.{_sub(mod)}.{mod}.s2ft.delta"] = len(units) * width * (
                    d_out if mod in ("o_proj", "down_proj") else d_in)
    return out


# ------------------------------------------------------------------------------------------------- the matrix
@dataclass(frozen=True)
class Row:
    """One `method=` option: its knobs for the tiny model, what its definition predicts, how it exports."""

    name: str
    expect: Callable[[SimpleNamespace], dict[str, int]]  # {parameter: numel} that train at step 0
    overrides: tuple[str, ...] = ()  # knobs that fit the tiny model (everything else: the YAML defaults)
    export: str = "model"  # model: a plain model directory | adapter: a peft adapter (merges) | prompt: soft prompt
    lr: float = 1e-2  # the test model's train.lr
    rewrites_base: bool = False  # the init rewrites base weights; the export converts to the original W
    refused: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = ()  # (overrides, words of the refusal)

    @property
    def samples_layers(self) -> bool:
        """The trainable set changes while training (LISA's re-draws: `method.history` of active blocks)."""
        return not METHODS.config(self.name).fixed_trainable_set


# The YAML's lr_scale is tuned for the tiny world's train.lr; here the test model's own LR applies as is.
UNSCALED = ("method.lr_scale=1.0",)
R4 = ("method.r=4",)
GENERAL_TEXT = ROOT / "tests" / "fixtures" / "general_text.jsonl"  # CorDA kpm's knowledge rows where data has none
ROWS = [
    Row("full", every_parameter),
    Row("lora", lora_adapters, R4, "adapter"),
    Row("rslora", lora_adapters, R4, "adapter"),
    Row("dora", dora_adapters, R4, "adapter"),
    Row("pissa", lora_adapters, R4, "adapter", rewrites_base=True,
        refused=((("method.svd_niter=0",), ("method.svd_niter", ">= 1")),)),
    Row("olora", lora_adapters, R4, "adapter", rewrites_base=True),
    Row("corda", lora_adapters, R4 + ("method.calib_samples=8", f"method.calib_source={GENERAL_TEXT}"), "adapter",
        rewrites_base=True,
        refused=((("method.mode=both",), ("method.mode", "kpm, ipm")),
                 (("method.calib_samples=0",), ("method.calib_samples",)),
                 (("method.calib_source=/no/such/knowledge.jsonl",), ("method.calib_source", "does not exist")))),
    Row("lora_ga", lora_adapters, R4 + ("method.calib_samples=8", "method.calib_batch_size=4"), "adapter",
        rewrites_base=True, refused=((("method.direction=up",), ("method.direction", "ArB2r")),)),
    Row("ia3", ia3_vectors, UNSCALED, "adapter", lr=0.05,
        refused=((("method.feedforward_modules=[up_proj]",), ("method.feedforward_modules",)),)),
    Row("prompt_tuning", soft_prompt, ("method.num_virtual_tokens=4",) + UNSCALED, "prompt", lr=0.1,
        refused=((("method.init=text",), ("method.init_text",)),
                 (("method.num_virtual_tokens=0",), ("method.num_virtual_tokens",)))),
    Row("freeze", top_blocks, ("method.train_top=1",), refused=((("method.llrd=0",), ("method.llrd",)),)),
    Row("hft", hft_half, refused=((("method.ratio=1",), ("method.ratio",)),)),
    Row("lisa", sampled_blocks, ("method.gamma=1", "method.interval=2"),
        refused=((("method.interval=0",), ("method.interval",)),)),
    Row("owlore", sampled_blocks, ("method.gamma=1", "method.interval=2"),
        refused=((("method.outlier_m=0",), ("method.outlier_m",)),
                 (("method.calib_source=both",), ("method.calib_source", "general, task")),
                 (("method.calib_source=general", "data=gsm8k"), ("method.calib_source", "needs general rows")),
                 (("method.galore_rank=0",), ("method.galore_rank",)))),
    Row("lift", lift_deltas, ("method.lora_rank=2", *UNSCALED),
        refused=((("method.percent=0",), ("method.percent", "(0, 100]")),
                 (("method.update_interval=-1",), ("method.update_interval",)),
                 (("method.target_modules=[]",), ("method.target_modules",)))),
    Row("s2ft", s2ft_deltas, ("method.v_ratio=0.5", "method.o_ratio=0.25", "method.u_ratio=0.0625",
                              "method.d_ratio=0.0625", *UNSCALED),
        refused=((("method.o_ratio=1.5",), ("method.o_ratio", "[0, 1]")),
                 (("method.o_ratio=0", "method.d_ratio=0"), ("method.o_ratio", "nothing trains")))),
    Row("ssf", ssf_vectors, UNSCALED),
]
ROW = {r.name: r for r in ROWS}
ALL = [r.name for r in ROWS]


@functools.lru_cache(maxsize=None)  # composing is ~0.5 s; the configs are only read
def method_cfg(name: str, *extra: str):
    (run,) = check([f"method={name}", *ROW[name].overrides, *extra])
    return run.method


def probe_batch():
    tok = make_tokenizer()
    rows = [encode_example(tok, r["prompt"], r["response"], 32) for r in make_rows(4, seed=1)]
    return collate(rows, tok.pad_token_id)


def logits_of(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def run_cfg(name: str, steps: int = STEPS, lr: float | None = None) -> LoopSettings:
    return LoopSettings(seed=0, train=TrainConfig(
        max_steps=steps, lr=lr or ROW[name].lr, batch_size=8, warmup_steps=0, schedule="constant",
        log_every=1, max_grad_norm=1.0))


def train_method(name: str, tmp: Path, *extra: str, reg=None, steps: int = STEPS, lr: float | None = None):
    """prepare + the real loop; returns a namespace with the method, model, start weights and loss curve."""
    tok = make_tokenizer()
    cfg = method_cfg(name, *extra)
    method = build_method(cfg)
    base = make_model()
    if reg is not None:
        reg.capture_base(base)
    ctx = MethodContext(tokenizer=tok, train_rows=make_rows(), seed=0, max_length=32)
    model = method.prepare(base, ctx)
    if reg is not None:
        reg.capture_start(model)
    trainable0 = {n for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    encoded = [encode_example(tok, r["prompt"], r["response"], 32) for r in make_rows()]
    tmp.mkdir(parents=True, exist_ok=True)
    stats = train(model, method, Batches(encoded, 8, 0), run_cfg(name, steps, lr), device="cpu",
                  pad_id=tok.pad_token_id, run_dir=tmp, progress=False, reg=reg)
    curve = [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(name=name, cfg=cfg, method=method, model=model, trainable0=trainable0, start=start,
                           curve=curve, stats=stats, dir=tmp)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (conftest.py)


_TRAINED: dict[str, SimpleNamespace] = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    def get(name: str) -> SimpleNamespace:
        if name not in _TRAINED:
            _TRAINED[name] = train_method(name, tmp_path_factory.mktemp(name))
        return _TRAINED[name]
    return get


# ------------------------------------------------------------------------------------------- registry and YAML
def test_matrix_covers_every_registered_method():
    assert sorted(ALL) == sorted(METHODS.names()), "one row per registered method (and no row without one)"
    assert len(set(ALL)) == len(ALL)
    for r in ROWS:
        assert r.export in ("model", "adapter", "prompt"), r.name


def test_every_method_has_a_yaml_and_every_yaml_names_a_method():
    import yaml

    yamls = {p.stem: p for p in (ROOT / "conf" / "method").glob("*.yaml")}
    assert sorted(yamls) == sorted(METHODS.names())
    for stem, path in yamls.items():
        text = path.read_text()
        first = text.splitlines()[0]
        assert first.startswith("# ") and len(first) > 10, f"{path.name}: the first line says what the method is"
        assert yaml.safe_load(text)["name"] == stem, f"{path.name}: `name:` is the file's own name"


def test_method_discovery_imports_no_torch():
    """Discovery imports every public module of ftlab.methods (validation does, on every `ftlab run`); none may
    import torch, peft or transformers at module level. Each method's default config passes its own checks."""
    code = ("import sys\n"
            "from ftlab.methods.base import METHODS\n"
            "names = METHODS.names()\n"
            "for n in names:\n"
            "    METHODS.config(n)().check()\n"
            "print(len(names), [m for m in ('torch', 'peft', 'transformers') if m in sys.modules])\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().split(maxsplit=1) == [str(len(ALL)), "[]"], p.stdout


# -------------------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("name", ALL)
def test_trainable_parameters_match_definition(name, trained):
    row, t = ROW[name], trained(name)
    got = {n: p.numel() for n, p in t.model.named_parameters() if n in t.trainable0}
    assert got == row.expect(t)
    assert t.stats.trainable_params == sum(got.values())
    assert t.stats.total_params == sum(p.numel() for p in t.model.parameters())
    if row.expect is not every_parameter:
        assert 0 < t.stats.trainable_params < t.stats.total_params


@pytest.mark.parametrize("name", ALL)
def test_only_trainable_parameters_move(name, trained):
    t = trained(name)
    ever = set(t.trainable0)
    if ROW[name].samples_layers:
        for _, active in t.method.history:
            ever |= {n for n, _ in t.model.named_parameters()
                     if any(n.startswith(f"model.layers.{i}.") for i in active)}
    moved = {n for n, p in t.model.named_parameters() if not torch.equal(p.detach(), t.start[n])}
    assert moved, f"{name}: nothing changed"
    assert moved <= ever, f"{name}: frozen parameters changed: {sorted(moved - ever)[:5]}"


@pytest.mark.parametrize("name", ALL)
def test_loss_falls(name, trained):
    t = trained(name)
    losses = [r["loss"] for r in t.curve]
    assert len(losses) == STEPS
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first, f"{name}: loss {losses}"


@pytest.mark.parametrize("name", ALL)
def test_export_reloads_onto_original_base(name, trained, tmp_path):
    from peft import PeftModel

    row, t = ROW[name], trained(name)
    batch = probe_batch()
    want = logits_of(t.model, batch)
    out = tmp_path / "export"
    t.method.export(t.model, out)
    if row.export == "model":
        from transformers import LlamaForCausalLM

        reloaded = LlamaForCausalLM.from_pretrained(out)
        assert (logits_of(reloaded, batch) - want).abs().max() <= RELOAD_ATOL
        return
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(make_model(), out)  # a fresh ORIGINAL base
    if row.export == "prompt":
        from ftlab.methods.prompt_tuning import PromptTunedLM

        assert (logits_of(PromptTunedLM(reloaded), batch) - want).abs().max() <= RELOAD_ATOL
        return  # prompts do not merge into weights
    assert (logits_of(reloaded, batch) - want).abs().max() <= RELOAD_ATOL
    merged = reloaded.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert (logits_of(merged, batch) - want).abs().max() <= MERGE_ATOL


@pytest.mark.parametrize("name", [r.name for r in ROWS if r.rewrites_base])
def test_rewriting_inits_export_plain_lora_for_the_original_base(name, trained, tmp_path):
    """These inits rewrite the base weights. The export is a plain LoRA adapter (init_lora_weights=true, rank
    2r) that any LoRA loader applies to the ORIGINAL W (the reload test above); the adapter saved naively is
    not: read as a plain LoRA on the original base it gives other logits (stack notes G5). (peft itself can
    reload a naive PiSSA/OLoRA adapter only by re-running the init on the base.)"""
    from peft import PeftModel

    t = trained(name)
    orig = make_model().model.layers[0].self_attn.q_proj.weight
    inside = t.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(inside, orig)
    t.method.export(t.model, tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert exported["init_lora_weights"] is True and exported["r"] == 2 * t.cfg.r
    t.model.save_pretrained(tmp_path / "naive")
    conf = tmp_path / "naive" / "adapter_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "init_lora_weights": True}))
    naive = PeftModel.from_pretrained(make_model(), tmp_path / "naive")
    batch = probe_batch()
    assert (logits_of(naive, batch) - logits_of(t.model, batch)).abs().max() > 10 * RELOAD_ATOL


REG_REFUSED = [
    (("reg=kl", "reg.weight=0"), ("reg.weight",)),
    (("reg=l2sp", "reg.kind=l3"), ("reg.kind", "none, kl, l2sp")),
    (("reg=kl", "reg.kl_on=general"), ("reg.kl_on", "task, mix, both")),
    (("reg=l2sp", "reg.kl_on=mix"), ("reg.kl_on", "only reg.kind=kl")),
    (("reg=kl", "reg.kl_on=mix", "data=gsm8k"), ("reg.kl_on", "general rows")),
    (("reg=kl", "reg.kl_on=both", "hw=cpu2_ddp"), ("reg.kl_on", "hw.nproc=1")),
]
REFUSED = [((f"method={r.name}", *o), w) for r in ROWS for o, w in r.refused] + REG_REFUSED


@pytest.mark.parametrize("overrides,words", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_method_and_reg_ranges_refused(overrides, words):
    with pytest.raises(ConfigError) as e:
        check(list(overrides))
    for w in words:
        assert w in str(e.value)


def test_corda_modes_differ():
    tok = make_tokenizer()
    ctx = MethodContext(tokenizer=tok, train_rows=make_rows(), seed=0, max_length=32)
    a = {}
    for mode in ("kpm", "ipm"):
        m = build_method(method_cfg("corda", f"method.mode={mode}")).prepare(make_model(), ctx)
        a[mode] = m.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight.detach().clone()
    assert not torch.allclose(a["kpm"], a["ipm"])


def _linear_inputs(rows) -> dict[str, torch.Tensor]:
    """Every block linear's inputs (tokens x width) on the ORIGINAL base, one row per forward."""
    tok, model, seen = make_tokenizer(), make_model(), {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.setdefault(n, []).append(i[0].reshape(-1, i[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():
        for r in rows:
            model(input_ids=torch.tensor([encode_example(tok, r["prompt"], r["response"], 32)["input_ids"]]))
    for h in hooks:
        h.remove()
    return {n: torch.cat(x) for n, x in seen.items()}


def _adapter_input_share(model, inputs: dict[str, torch.Tensor]) -> float:
    """The share of the inputs' energy inside the adapters' input subspace (the row space of A), averaged over the
    target layers: how much of those inputs the trained directions see (fidelity-methods.md, s4)."""
    shares = []
    for n, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            q, _ = torch.linalg.qr(m.lora_A["default"].weight.detach().T)
            x = inputs[n.removeprefix("base_model.model.")]
            shares.append(((x @ q).pow(2).sum() / x.pow(2).sum()).item())
    return sum(shares) / len(shares)


def _knowledge_rows(n: int, seed: int) -> list[dict]:
    """Text the base should keep knowing: words over g..z and digits, none of the task's letters a..f."""
    rng = random.Random(seed)
    chars = "ghijklmnopqrstuvwxyz0123456789"
    return [{"prompt": "", "response": " ".join("".join(rng.choice(chars) for _ in range(rng.randint(2, 5)))
                                                for _ in range(4))} for _ in range(n)]


def test_corda_kpm_calibrates_on_the_knowledge_and_keeps_its_inputs_out_of_the_adapter(tmp_path):
    """KPM as the paper: calibrated on the general rows (here data.mix_source, text standing for the knowledge to
    keep), the adapter's input subspace carries far less energy of held-out knowledge inputs than of task inputs.
    Calibrated on the task's own rows (ftlab before issue 13, now method.calib_source=task) it is the other way
    round: it protects the task's unused directions and trains in the knowledge's."""
    from ftlab.config.schema import DataConfig

    path = tmp_path / "knowledge.jsonl"
    path.write_text("".join(json.dumps({"text": r["response"]}) + "\n" for r in _knowledge_rows(300, 0)))
    ctx = MethodContext(tokenizer=make_tokenizer(), train_rows=make_rows(64), seed=0, max_length=32,
                        data=DataConfig(source="jsonl", mix_source=str(path)))
    knowledge, task = _linear_inputs(_knowledge_rows(96, 1)), _linear_inputs(make_rows(96, seed=7))  # held out
    share = {}
    for source in ("null", "task"):
        method = build_method(method_cfg("corda", f"method.calib_source={source}", "method.calib_samples=256"))
        model = method.prepare(make_model(), ctx)
        share[source] = (_adapter_input_share(model, knowledge), _adapter_input_share(model, task))
        assert method.report()["covariance"]["source"] == ("general" if source == "null" else "task")
    (k, t), (k_task, t_task) = share["null"], share["task"]
    assert k < t / 4, share  # measured 0.012 vs 0.084
    assert k < k_task / 4, share  # measured 0.012 vs 0.10
    assert k_task > t_task, share  # task-calibrated: the knowledge's directions are the ones trained


def test_corda_calibration_source_by_mode_and_covariance_rank(capfd):
    """kpm defaults to the run's general rows (synthetic data: the replay of the world's pretraining skills, train
    split), ipm to the task's rows; a FILE is read like data.mix_source. 256 rows by default (the paper's). A
    rank-deficient covariance is said on stderr and recorded. Data without general rows is refused at compose
    time, naming the ways out."""
    from ftlab.config.schema import DataConfig
    from ftlab.data.sources import general_rows

    tok = make_tokenizer()
    data = DataConfig(source="synth", skill="sub", mix_skills=["add", "rev"])
    ctx = MethodContext(tokenizer=tok, train_rows=make_rows(), seed=3, max_length=32, data=data)
    assert check(["method=corda"])[0].method.calib_samples == 256
    kpm = build_method(method_cfg("corda", "method.calib_source=null", "method.calib_samples=12"))
    want = [encode_example(tok, r["prompt"], r["response"], 32) for r in general_rows(data, 12, 3)]
    assert kpm.calibration_rows(ctx) == want
    assert {r["id"].split("-")[0] for r in general_rows(data, 12, 3)} == {"mix:add", "mix:rev"}
    ipm = build_method(method_cfg("corda", "method.calib_source=null", "method.mode=ipm", "method.calib_samples=12"))
    assert ipm.calibration_rows(ctx) == ctx.calibration_rows(12)
    text = build_method(method_cfg("corda", "method.calib_samples=5")).calibration_rows(ctx)
    first = json.loads(GENERAL_TEXT.read_text().splitlines()[0])["text"]
    assert len(text) == 5 and all(r["labels"] for r in text) and first  # the fixture's texts, as LM rows

    kpm.prepare(make_model(), ctx)  # 12 short rows of two skills: too few directions for a width of 32
    cov = kpm.report()["covariance"]
    assert cov["source"] == "general" and cov["rows"] == 12 and cov["full_rank"] < cov["targets"] == 14
    assert cov["lowest"]["rank"] < cov["lowest"]["width"]
    assert "rank-deficient" in capfd.readouterr().err

    fixture = Path(__file__).parent / "fixtures" / "gsm8k_mini.jsonl"
    with pytest.raises(ConfigError, match="method.calib_source") as e:
        check(["method=corda", "data=gsm8k", f"data.path={fixture}", "eval=target"])
    assert "data.mix_source" in str(e.value) and "method.calib_source=task" in str(e.value)
    for ok in (["method.calib_source=task"], ["method.mode=ipm"], [f"data.mix_source={GENERAL_TEXT}"],
               [f"method.calib_source={GENERAL_TEXT}"]):
        check(["method=corda", "data=gsm8k", f"data.path={fixture}", "eval=target", *ok])


def test_lora_ga_init_is_the_papers(tmp_path):
    """The paper's / official init (Outsider565/LoRA-GA lora_ga_init): for direction ArB2r, A = c V[:, :r]^T and
    B = c U[:, r:2r] of the mean calibration gradient G = U S V^T, c = d_out^(1/4) / sqrt(gamma) on BOTH factors and
    no singular values; the base keeps W - s B A, so the model equals the base at step 0. (peft 0.21.2: A rows of
    norm 1, B columns scaled by the singular values.) Calibration: 128 rows in batches of 2 unless configured."""
    c0 = check(["method=lora_ga"])[0].method
    assert (c0.calib_samples, c0.calib_batch_size) == (128, 2)
    tok = make_tokenizer()
    ctx = MethodContext(tokenizer=tok, train_rows=make_rows(), seed=0, max_length=32)
    method = build_method(method_cfg("lora_ga"))
    model = method.prepare(make_model(), ctx)
    probe = make_model()  # the same rows' gradient, estimated on a fresh base by the method's own preprocess
    method.preprocess(probe, method.peft_config(), ctx)
    orig = make_model()
    r, gamma, s, full = 4, 16.0, 8 / 4, 0
    for i in range(LAYERS):
        for mod, (d_in, d_out) in LINEAR.items():
            layer = model.base_model.model.model.layers[i].get_submodule(f"{_sub(mod)}.{mod}")
            a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
            c = d_out ** 0.25 / gamma ** 0.5
            assert a.shape == (r, d_in) and b.shape == (d_out, r)
            assert torch.allclose(a @ a.T, c ** 2 * torch.eye(r), atol=1e-5), (i, mod)  # orthogonal rows of norm c
            assert torch.allclose(b.T @ b, c ** 2 * torch.eye(r), atol=1e-5), (i, mod)  # orthogonal columns of norm c
            assert layer.scaling["default"] == s
            w0 = orig.model.layers[i].get_submodule(f"{_sub(mod)}.{mod}").weight
            assert (layer.base_layer.weight - (w0 - s * b @ a)).abs().max() <= 1e-6
            g = probe.model.layers[i].get_submodule(f"{_sub(mod)}.{mod}")._peft_loraga_grad
            u, sv, vh = torch.linalg.svd(g)
            # A spans G's top-r right singular directions, B the next r left ones (where G has 2r directions: the
            # first block's q/k/v/gate/up see only the task's 7 tokens, so their gradients have rank 7)
            assert (vh[:r] @ (a / c).T).pow(2).sum() == pytest.approx(r, abs=1e-3), (i, mod)
            if sv[2 * r - 1] > 1e-3 * sv[0]:
                assert (u[:, r:2 * r].T @ (b / c)).pow(2).sum() == pytest.approx(r, abs=1e-3), (i, mod)
                full += 1
    assert full >= len(LINEAR)
    batch = probe_batch()
    assert (logits_of(model, batch) - logits_of(make_model(), batch)).abs().max() <= RELOAD_ATOL
    with pytest.raises(ValueError, match="method.r: LoRA-GA takes 2r = 18"):  # k_proj is 32 x 16
        build_method(method_cfg("lora_ga", "method.r=9")).prepare(make_model(), ctx)


LORA_FAMILY = ("lora", "rslora", "dora", "pissa", "olora", "corda", "lora_ga")


def test_lora_family_starts_at_one_scale():
    """One convention (docs/methods.md, Scale): every LoRA-family YAML starts at scale 1 at its own rank, alpha/r
    (alpha = r = 8), rsLoRA alpha/sqrt(r) at r = 64, so the variants differ by their init, not by their learning
    rate; each YAML's config class has the same defaults as the YAML."""
    for name in LORA_FAMILY:
        (run,) = check([f"method={name}"])
        m = run.method
        scale = m.alpha / (m.r ** 0.5 if m.use_rslora else m.r)
        assert scale == 1.0, (name, m.alpha, m.r, m.use_rslora)
        assert (m.alpha, m.r, m.use_rslora) == ((d := METHODS.config(name)()).alpha, d.r, d.use_rslora), name
    assert check(["method=rslora"])[0].method.r == 64


# ------------------------------------------------------------------------------------------ method specifics
def test_hft_draw_is_seeded_and_redrawn_per_stage():
    tok = make_tokenizer()

    def draw(seed, stage):
        ctx = MethodContext(tokenizer=tok, train_rows=make_rows(), seed=seed, max_length=32)
        m = build_method(method_cfg("hft", f"method.stage={stage}"))
        m.prepare(make_model(), ctx)
        return m.selection

    assert draw(0, 0) == draw(0, 0)
    draws = [draw(0, s) for s in range(4)] + [draw(s, 0) for s in range(1, 4)]
    assert len({json.dumps(d, sort_keys=True) for d in draws}) > 1


def _ffn_counts(method) -> list[int]:
    return [len(sel["mlp"]) for _, sel in sorted(method.selection.items())]


def test_hft_a_random_half_of_the_blocks_train_two_ffn_matrices():
    """FFN: a seeded random half of the blocks trains 2 of gate/up/down, the other half 1 (the paper; gucci-j/ssu
    shuffles the layer indices), not every even-indexed block (the old rule: blocks 0, 2, 4, ... always got 2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def deep():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                            num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2))

    tok = make_tokenizer()
    twos = []
    for seed in range(6):
        m = build_method(method_cfg("hft"))
        m.prepare(deep(), MethodContext(tokenizer=tok, train_rows=[], seed=seed))
        counts = _ffn_counts(m)
        assert sorted(counts) == [1] * 4 + [2] * 4  # exactly half of the blocks, 12 of 24 FFN matrices
        twos.append(frozenset(i for i, c in enumerate(counts) if c == 2))
    assert len(set(twos)) > 3 and frozenset({0, 2, 4, 6}) not in twos
    firsts = set()
    for seed in range(8):  # the 2-block test model: which block gets the 2 varies with the seed
        m = build_method(method_cfg("hft"))
        m.prepare(make_model(), MethodContext(tokenizer=tok, train_rows=[], seed=seed))
        firsts.add(_ffn_counts(m)[0])
    assert firsts == {1, 2}


def test_hft_categories_recognise_qk_norms_and_other_architectures():
    """A Qwen3-shaped tiny model (random weights): q_norm / k_norm are norms, not attention units, so every block
    trains 2 of its 4 projections and 2 of its 4 norms. Other layouts are classified by what a unit is (GPT-2, Llama
    4-style names, MoE experts); a unit the rules do not know is its own category, halved the same way."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ftlab.methods.hft import block_units, category

    torch.manual_seed(0)
    qwen = Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    units = block_units(qwen.model.layers[0])
    assert sorted(units["attn"]) == [f"self_attn.{m}" for m in ("k_proj", "o_proj", "q_proj", "v_proj")]
    assert sorted(units["norm"]) == ["input_layernorm", "post_attention_layernorm", "self_attn.k_norm",
                                     "self_attn.q_norm"]
    method = build_method(method_cfg("hft"))
    model = method.prepare(qwen, MethodContext(tokenizer=make_tokenizer(), train_rows=[], seed=0))
    for i, sel in method.selection.items():
        assert len(sel["attn"]) == 2 and all(u.endswith("_proj") for u in sel["attn"])
        assert len(sel["norm"]) == 2
    assert sum(len(sel["mlp"]) for sel in method.selection.values()) == 3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= trainable

    assert category("ln_1") == category("ln_2") == category("post_feedforward_layernorm") == "norm"
    assert category("attn.c_attn") == category("attention.wqkv") == "attn"
    assert category("mlp.c_fc") == category("feed_forward.w1") == category("block_sparse_moe.experts.0.w1") == "mlp"
    assert category("router.weight") == "other"

    class Block(torch.nn.Module):  # a block with a unit of unknown kind: 4 of them, so 2 train
        def __init__(self):
            super().__init__()
            self.self_attn = torch.nn.ModuleDict({m: torch.nn.Linear(4, 4) for m in ("q_proj", "k_proj")})
            self.mixers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(4))

    units = block_units(Block())
    assert sorted(units) == ["attn", "other"] and len(units["other"]) == 4


def test_hft_redraws_its_half_on_each_later_stage(tmp_path):
    """on_stage_start(model, 0) keeps prepare's draw; stage k > 0 re-draws with (seed, method.stage + k), the
    draw a single run with method.stage=k makes; training in the new stage moves only the new half; a
    checkpoint's method state brings a fresh method back to its stage's half."""
    tok = make_tokenizer()
    ctx = MethodContext(tokenizer=tok, train_rows=make_rows(), seed=0, max_length=32)

    def fresh(stage=0):
        m = build_method(method_cfg("hft", f"method.stage={stage}"))
        return m, m.prepare(make_model(), ctx)

    def trainable(model):
        return {n for n, p in model.named_parameters() if p.requires_grad}

    method, model = fresh()
    first = (json.dumps(method.selection, sort_keys=True), trainable(model))
    method.on_stage_start(model, 0)
    assert (json.dumps(method.selection, sort_keys=True), trainable(model)) == first
    encoded = [encode_example(tok, r["prompt"], r["response"], 32) for r in make_rows()]
    redrawn = False
    for stage in (1, 2, 3):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        method.on_stage_start(model, stage)
        ref, ref_model = fresh(stage)
        assert method.selection == ref.selection and trainable(model) == trainable(ref_model)
        redrawn |= trainable(model) != first[1]
        train(model, method, Batches(encoded, 8, stage), run_cfg("hft", steps=2), device="cpu", pad_id=0,
              run_dir=tmp_path, progress=False)
        moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        assert moved and moved <= trainable(model), stage
    assert redrawn
    restored, rmodel = fresh()
    restored.load_state_dict(method.state_dict(), rmodel)
    assert restored.selection == method.selection and trainable(rmodel) == trainable(model)


def test_lisa_resamples_every_k_steps_and_releases_optimizer_state(tmp_path):
    """gamma=1 of 2 blocks, K=2: requires_grad follows the draw at each step, draws happen exactly at multiples
    of K, the active set changes over the run, and inactive blocks hold no AdamW state."""
    from ftlab.methods.lisa import Lisa

    seen = []  # (step, active blocks by requires_grad, blocks with optimizer state)

    class Spy(Lisa):
        def on_step_end(self, model, optimizer, step):
            super().on_step_end(model, optimizer, step)
            params = dict(model.named_parameters())
            req = sorted({int(n.split(".")[2]) for n, p in params.items()
                          if n.startswith("model.layers.") and p.requires_grad})
            state = sorted({int(n.split(".")[2]) for n, p in params.items()
                            if n.startswith("model.layers.") and p in optimizer.state})
            seen.append((step, req, state))

    cfg = method_cfg("lisa", "method.interval=2")
    tok = make_tokenizer()
    method = Spy(cfg)
    model = method.prepare(make_model(), MethodContext(tokenizer=tok, train_rows=make_rows(), seed=0))
    encoded = [encode_example(tok, r["prompt"], r["response"], 32) for r in make_rows()]
    train(model, method, Batches(encoded, 8, 0), run_cfg("lisa", steps=12), device="cpu", pad_id=0,
          run_dir=tmp_path, progress=False)
    assert [s for s, _ in method.history] == [0, 2, 4, 6, 8, 10, 12]
    draws = dict(method.history)
    for step, req, state in seen:
        current = draws[max(s for s in draws if s <= step)]
        assert req == current and len(req) == 1
        assert set(state) <= set(current)  # state of de-activated blocks was released
    assert len({tuple(a) for _, a in method.history}) == 2  # the active block changes over the run
    changes = sum(1 for (_, a), (_, b) in zip(method.history, method.history[1:]) if a != b)
    assert changes >= 2


def test_optimizer_state_bytes_full_exact_and_layer_sampling_below(trained):
    """full holds AdamW's exp_avg + exp_avg_sq (fp32) for every parameter plus a 4-byte step per parameter;
    LISA and OwLore release the state of inactive blocks, so their peak is below full's."""
    full = trained("full")
    params = list(full.model.parameters())
    assert full.stats.optimizer_state_bytes == sum(8 * p.numel() + 4 for p in params)
    for name in [r.name for r in ROWS if r.samples_layers]:
        t = trained(name)
        assert 0 < t.stats.optimizer_state_bytes < full.stats.optimizer_state_bytes, name


def test_owlore_owl_score_samples_the_planted_outlier_layer_more_often(tmp_path):
    """OWL's score |W_ij| * ||X_j|| (calibration activations), pooled over the layer, threshold M x the layer's
    mean. Block 1 gets an activation outlier (one input channel of its MLP scaled up through its norm; no weight
    changes), block 0 large weights on an input channel that carries no activation (its norm zeroes it): a
    weight-only score (today's old rule) favours block 0, OWL favours block 1, and the draw follows ratio / sum."""
    from collections import Counter

    from ftlab.methods.owlore import outlier_ratio

    a = torch.tensor([[1.0, 1.0], [1.0, 9.0]])
    assert outlier_ratio([a, torch.ones(2, 2)], 2.0) == 1 / 8  # pooled mean 2: only 9 > 4
    assert outlier_ratio([a, 10 * torch.ones(2, 2)], 2.0) == 0.0  # pooled mean 6.5 (a per-matrix mean: 1/8)

    model = make_model()
    with torch.no_grad():
        b0, b1 = model.model.layers
        b1.post_attention_layernorm.weight[5] = 30.0  # MLP input channel 5 of block 1: 30x the activation
        b0.input_layernorm.weight[7] = 0.0  # q/k/v input channel 7 of block 0 carries nothing ...
        for lin in (b0.self_attn.q_proj, b0.self_attn.k_proj, b0.self_attn.v_proj):
            lin.weight[:, 7] *= 30  # ... while its weights are 30x larger

    def weight_only(block, m=5.0):  # the rule this replaced: |W| alone
        return outlier_ratio([mod.weight.abs() for mod in block.modules() if isinstance(mod, torch.nn.Linear)], m)

    assert weight_only(b0) > weight_only(b1)
    method = build_method(method_cfg("owlore", "method.outlier_m=7"))
    method.prepare(model, MethodContext(tokenizer=make_tokenizer(), train_rows=make_rows(), seed=0, max_length=32))
    r = method.ratios
    assert r[1] > 3 * r[0] > 0
    assert method.probs == pytest.approx([r[0] / sum(r), r[1] / sum(r)])
    counts = Counter(method.draw()[0] for _ in range(4000))
    assert counts[1] > 0.7 * 4000
    assert counts[1] / 4000 == pytest.approx(method.probs[1], abs=0.03)
    rep = method.report()
    assert rep["outlier_ratio"] == r and rep["sampling"] == "proportional to the OWL outlier ratio"
    assert rep["calib"]["source"] == "task" and rep["calib"]["rows"] == 128  # no general rows in this context


def test_owlore_calibrates_on_general_rows_and_scales_galore_rank(tmp_path):
    """With a source of general rows in the data config, ||X_j|| comes from them (pretraining-like text, as OWL's C4);
    galore_rank null is the official 256 at width 4096 scaled with the width; the YAML has the official interval 50
    and update_proj_gap 100."""
    from ftlab.config.schema import DataConfig
    from ftlab.methods.owlore import galore_rank_for

    assert [galore_rank_for(d) for d in (4096, 2048, 64, 32, 8)] == [256, 128, 4, 2, 1]
    (run,) = check(["method=owlore"])
    cfg = run.method
    assert (cfg.interval, cfg.galore_update_proj_gap, cfg.galore_rank, cfg.outlier_m) == (50, 100, None, 13.0)
    text = tmp_path / "general.jsonl"
    text.write_text("".join(json.dumps({"text": f"{w} {w[::-1]} 12 = 21"}) + "\n" for w in ("abcd", "efab", "cdef")))
    ctx = MethodContext(tokenizer=make_tokenizer(), train_rows=make_rows(), seed=0, max_length=32,
                        data=DataConfig(name="x", mix_source=str(text)))
    method = build_method(method_cfg("owlore", "method.calib_samples=6"))
    method.prepare(make_model(), ctx)
    rep = method.report()
    assert rep["calib"]["source"] == "general" and rep["calib"]["rows"] == 6
    assert rep["galore_rank"] == HIDDEN // 16
    task = build_method(method_cfg("owlore", "method.calib_samples=6", "method.calib_source=task"))
    task.prepare(make_model(), ctx)
    assert task.report()["calib"]["source"] == "task"
    with pytest.raises(ValueError, match="calib_source=general needs general rows"):
        build_method(method_cfg("owlore", "method.calib_source=general")).prepare(
            make_model(), MethodContext(tokenizer=make_tokenizer(), train_rows=make_rows(), seed=0, max_length=32))


def _galore_importable() -> bool:
    from ftlab.methods.owlore import galore_unavailable

    return galore_unavailable() is None


def test_owlore_without_galore_says_so(tmp_path, capfd, monkeypatch):
    """No galore_torch: plain AdamW (full-rank moments of the active block), on stderr and in train.method.
    (galore-torch is in the dev extra; a None entry in sys.modules makes its import fail as if it were absent.)"""
    monkeypatch.setitem(sys.modules, "galore_torch", None)
    method = build_method(method_cfg("owlore"))
    method.prepare(make_model(), MethodContext(tokenizer=make_tokenizer(), train_rows=make_rows(), seed=0))
    assert "galore_torch is not importable" in capfd.readouterr().err
    t = train_method("owlore", tmp_path)
    assert t.stats.method["galore"] is False
    assert t.stats.method["galore_note"].startswith("plain AdamW: galore_torch is not importable")
    w = t.model.model.layers[t.method.active[0]].mlp.down_proj.weight
    opt = t.method.build_optimizer([{"params": [w]}], lr=1e-3, betas=(0.9, 0.999))
    assert type(opt) is torch.optim.AdamW


@pytest.mark.skipif(not _galore_importable(), reason="galore_torch is not installed (pip install galore-torch)")
def test_owlore_galore_low_rank_state_and_exact_checkpoint_round_trip(tmp_path):
    """With galore_torch: the active blocks' matrices keep rank-`galore_rank` moments, and the optimizer's
    state_dict holds tensors only (weights_only loadable) and restores the projection exactly."""
    t = train_method("owlore", tmp_path, "method.galore_rank=4", steps=3)
    assert t.stats.method["galore"] is True

    model, method = t.model, t.method
    opt = method.build_optimizer(method.param_groups(model, 0.0), lr=1e-2, betas=(0.9, 0.999))
    batch = probe_batch()
    for _ in range(2):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out.logits.float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    w = model.model.layers[method.active[0]].mlp.down_proj.weight  # (32, 64)
    assert opt.state[w]["exp_avg"].shape == (4, 64)  # projected onto 4 of the 32 row directions
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    sd = torch.load(tmp_path / "opt.pt", weights_only=True)
    opt2 = method.build_optimizer(method.param_groups(model, 0.0), lr=1e-2, betas=(0.9, 0.999))
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.state[w]["projector"].ortho_matrix, opt.state[w]["projector"].ortho_matrix)
    assert torch.equal(opt2.state[w]["exp_avg"], opt.state[w]["exp_avg"])


def _effective_changes(t) -> dict[str, set[int]]:
    """{block linear name: flat positions where the trained effective weight (the export's merged one) differs from
    the original base}."""
    from ftlab.methods._sparse import merged_state_dict

    base = dict(make_model().named_modules())
    merged = merged_state_dict(t.model)
    out = {}
    for i in range(LAYERS):
        for mod in LINEAR:
            name = f"model.layers.{i}.{_sub(mod)}.{mod}"
            w = merged[f"{name}.weight"]
            out[name] = set((w != base[name].weight).reshape(-1).nonzero().flatten().tolist())
    return out


def _principal(w: torch.Tensor, r: int, k: int) -> set[int]:
    """The k largest entries of |rank-r approximation of w| (a full SVD, independently of the method's code)."""
    u, sv, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
    return set(torch.topk(((u[:, :r] * sv[:r]) @ vh[:r]).abs().reshape(-1), k).indices.tolist())


def test_lift_changes_exactly_the_principal_weights(trained):
    """The selected entries are the (d_in + d_out) * lora_rank largest of |rank-r approximation| per matrix (the
    reference's LoRA-matched budget); after training exactly those entries of each matrix differ from the base, no
    others; the optimizer state is the deltas' (2 moments + step each), far below full's. `percent` is the option."""
    t = trained("lift")
    base = dict(make_model().named_modules())
    changed = _effective_changes(t)
    n_selected = 0
    for name, pos in changed.items():
        k = lift_budget(t.cfg, name.rsplit(".", 1)[-1])
        assert k == (LINEAR[name.rsplit(".", 1)[-1]][0] + LINEAR[name.rsplit(".", 1)[-1]][1]) * 2  # lora_rank=2
        assert pos == _principal(base[name].weight, t.cfg.r, k), name
        n_selected += k
    assert t.stats.trainable_params == n_selected
    assert t.stats.optimizer_state_bytes == 8 * n_selected + 4 * len(changed)
    assert t.stats.optimizer_state_bytes < trained("full").stats.optimizer_state_bytes / 4
    assert t.stats.method["selected"]["entries"] == n_selected
    assert t.stats.method["optimizer_state"].startswith("sparse")
    (run,) = check(["method=lift"])
    assert (run.method.lora_rank, run.method.percent, run.method.update_interval) == (8, None, 400)
    pct = build_method(method_cfg("lift", "method.percent=5"))
    m = pct.prepare(make_model(), MethodContext(tokenizer=make_tokenizer(), train_rows=[], seed=0))
    from ftlab.methods._sparse import deltas

    assert {n: d.index.numel() for n, d in deltas(m).items()} == {
        n: round(0.05 * LINEAR[n.rsplit(".", 1)[-1]][0] * LINEAR[n.rsplit(".", 1)[-1]][1]) for n in changed}


def test_lift_reselects_its_mask_every_interval(tmp_path):
    """update_interval=2: after steps 2, 4, 6 each mask is re-selected from the CURRENT weights (the top entries of
    the rank-r approximation of W + its change), and only then; the effective weights do not jump at a re-selection;
    an entry moves only while it is in the current mask; kept entries keep their Adam moments (at their new slot),
    new entries start at zero; a checkpoint's method state rebuilds masks and frozen weights exactly."""
    from ftlab.methods._sparse import deltas
    from ftlab.methods.lift import Lift

    seen = []  # (step, {name: effective W before}, {name: mask before}, {name: moments before}, after...)

    class Spy(Lift):
        def on_step_end(self, model, optimizer, step):
            def snap():
                ds = deltas(model)
                return ({n: model.get_submodule(n).weight.detach().clone() for n in ds},
                        {n: d.index.clone() for n, d in ds.items()},
                        {n: optimizer.state[d.delta]["exp_avg"].clone() for n, d in ds.items()})
            before = snap()
            super().on_step_end(model, optimizer, step)
            seen.append((step, before, snap()))

    cfg = method_cfg("lift", "method.update_interval=2")
    tok = make_tokenizer()
    method = Spy(cfg)
    model = method.prepare(make_model(), MethodContext(tokenizer=tok, train_rows=make_rows(), seed=0))
    masks0 = {n: d.index.clone() for n, d in deltas(model).items()}
    encoded = [encode_example(tok, r["prompt"], r["response"], 32) for r in make_rows()]
    train(model, method, Batches(encoded, 8, 0), run_cfg("lift", steps=6, lr=0.05), device="cpu", pad_id=0,
          run_dir=tmp_path, progress=False)
    base = make_model()
    prev_w, prev_mask, moved_any = {n: base.get_submodule(n).weight.detach() for n in masks0}, masks0, 0
    for step, (w, mask, moments), (w2, mask2, moments2) in seen:
        for n in w:
            changed = set((w[n] != prev_w[n]).reshape(-1).nonzero().flatten().tolist())
            assert changed <= set(prev_mask[n].tolist()), (step, n)  # only the mask in force during the step moved
            assert torch.equal(w2[n], w[n])  # re-selection never changes the model
            if step % 2:
                assert torch.equal(mask2[n], mask[n])
                continue
            k = mask[n].numel()
            assert set(mask2[n].tolist()) == _principal(w[n], cfg.r, k), (step, n)
            old_at = {p: i for i, p in enumerate(mask[n].tolist())}
            for j, p in enumerate(mask2[n].tolist()):
                want = moments[n][old_at[p]] if p in old_at else 0.0
                assert moments2[n][j] == want
            moved_any += len(set(mask2[n].tolist()) - set(mask[n].tolist()))
        prev_w, prev_mask = w2, mask2
    assert moved_any > 0  # the masks did change
    assert [u["step"] for u in method.updates] == [2, 4, 6]

    fresh = Lift(cfg)
    fmodel = fresh.prepare(make_model(), MethodContext(tokenizer=tok, train_rows=make_rows(), seed=0))
    fresh.load_state_dict(method.state_dict(), fmodel)
    with torch.no_grad():
        for n, p in fmodel.named_parameters():
            if n.endswith(".delta"):
                p.copy_(dict(model.named_parameters())[n])
    for n in masks0:
        assert torch.equal(fmodel.get_submodule(n).weight, model.get_submodule(n).weight), n


def test_s2ft_changes_only_the_chosen_heads_and_channels(trained):
    """o_proj changes in exactly the chosen query heads' columns, v_proj in the chosen kv heads' rows, up_proj in the
    chosen channels' rows, down_proj in the chosen channels' columns; q/k/gate never. Each kind is a share of all the
    model's units, drawn globally (per-block counts vary with the seed) and on its own (v's heads and o's, u's
    channels and d's, are independent draws); the draw is seeded."""
    from ftlab.methods.s2ft import unit_count

    t = trained("s2ft")
    changed = _effective_changes(t)
    totals = {"v": 2 * LAYERS, "o": 4 * LAYERS, "u": INTER * LAYERS, "d": INTER * LAYERS}
    for kind, (mod, unit, width) in S2FT_UNITS.items():
        ratio = getattr(t.cfg, f"{kind}_ratio")
        assert sum(len(t.method.selection[i].get(f"{kind}_{unit}", [])) for i in range(LAYERS)) == unit_count(
            ratio, totals[kind]) == t.method.counts[kind]
    for i in range(LAYERS):
        sel = t.method.selection[i]
        for mod, (d_in, d_out) in LINEAR.items():
            pos = changed[f"model.layers.{i}.{_sub(mod)}.{mod}"]
            rows, cols = {p // d_in for p in pos}, {p % d_in for p in pos}
            if mod in ("q_proj", "k_proj", "gate_proj"):
                assert not pos, (i, mod)
                continue
            kind = {"v_proj": "v", "o_proj": "o", "up_proj": "u", "down_proj": "d"}[mod]
            _, unit, width = S2FT_UNITS[kind]
            want = {u * width + j for u in sel.get(f"{kind}_{unit}", []) for j in range(width)}
            if not want:
                assert not pos, (i, mod)
            elif mod in ("o_proj", "down_proj"):
                assert cols == want and len(rows) == d_out, (i, mod)
            else:
                assert rows == want and len(cols) == d_in, (i, mod)
            assert len(pos) == len(rows) * len(cols)  # whole rows / columns, nothing else

    def draw(seed, *extra):
        m = build_method(method_cfg("s2ft", *extra))
        m.prepare(make_model(), MethodContext(tokenizer=make_tokenizer(), train_rows=[], seed=seed))
        return m.selection

    assert draw(0) == draw(0) == t.method.selection
    draws = [draw(s) for s in range(8)]
    assert len({json.dumps(d, sort_keys=True) for d in draws}) == 8
    # global sampling: the blocks' shares of the o heads differ between draws
    assert len({tuple(len(d[i].get("o_heads", [])) for i in range(LAYERS)) for d in draws}) > 1
    # independent draws: o's heads do not decide v's kv heads, nor d's channels u's
    assert any({h // 2 for h in d[i].get("o_heads", [])} != set(d[i].get("v_kv_heads", []))
               for d in draws for i in range(LAYERS))
    assert any(d[i].get("u_channels") != d[i].get("d_channels") for d in draws for i in range(LAYERS))
    assert t.stats.optimizer_state_bytes == 8 * t.stats.trainable_params + 4 * len(
        [n for n in t.trainable0 if n.endswith(".delta")])


def test_s2ft_defaults_to_the_output_side_with_partial_backprop():
    """The YAML trains o_proj columns and down_proj columns only (the official o_ratio 0.052, d_ratio 0.02; v and u
    0). Backward forms no gradient of the frozen weights, and the trained block's gradient equals the dense
    gradient of W restricted to its columns (the partial back-propagation of the paper's S2RowLinear)."""
    from ftlab.methods._sparse import slices

    (run,) = check(["method=s2ft"])
    c = run.method
    assert (c.v_ratio, c.o_ratio, c.u_ratio, c.d_ratio) == (0.0, 0.052, 0.0, 0.02)
    method = build_method(c)
    model = method.prepare(make_model(), MethodContext(tokenizer=make_tokenizer(), train_rows=[], seed=0))
    assert {n.rsplit(".", 1)[-1] for n in slices(model)} == {"o_proj", "down_proj"}
    assert method.counts == {"o": 1, "d": 3}  # round(0.052 * 8) = 0 -> at least 1; round(0.02 * 128) = 3

    dense = make_model()  # the same weights, every weight trainable: the reference gradient
    batch = probe_batch()
    for m in (model, dense):
        out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out.logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith(".delta"))
    for name, sl in slices(model).items():
        g = dense.get_submodule(name).weight.grad
        want = g.index_select(sl.axis, sl.index)
        assert torch.allclose(sl.delta.grad, want, atol=1e-6), name


def test_ssf_folds_into_biased_plain_model_and_refuses_unfoldable_targets(trained, tmp_path):
    """The export is W' = diag(scale) W, b' = scale * b + shift in a Llama with attention_bias/mlp_bias on (the
    generic test checks its logits); a Qwen2 (q/k/v have biases, o_proj and the MLP cannot) is refused before
    training unless those targets are dropped and the shift after its post-attention norm (which feeds the bias-less
    MLP) is off, and then exports a foldable Qwen2."""
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    t = trained("ssf")
    m = t.model.model
    for p in (m.layers[0].mlp.up_proj.ssf_scale, m.embed_tokens.ssf_scale, m.norm.ssf_scale):
        assert not torch.equal(p, torch.ones_like(p))  # trained
    for p in (m.layers[1].input_layernorm.ssf_shift, m.embed_tokens.ssf_shift):
        assert not torch.equal(p, torch.zeros_like(p))
    t.method.export(t.model, tmp_path / "llama")
    conf = AutoConfig.from_pretrained(tmp_path / "llama")
    assert conf.attention_bias is True and conf.mlp_bias is True
    assert not hasattr(t.model.config, "ssf") and t.model.config.mlp_bias is False  # the live model is untouched

    qcfg = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)
    ctx = MethodContext(tokenizer=make_tokenizer(), train_rows=[], seed=0)
    with pytest.raises(ValueError, match=r"no bias on \['down_proj', 'gate_proj', 'o_proj', 'up_proj'\]"):
        build_method(method_cfg("ssf")).prepare(Qwen2ForCausalLM(qcfg), ctx)
    with pytest.raises(ValueError, match=r"after \['post_attention_layernorm'\].*method.norms=false"):
        build_method(method_cfg("ssf", "method.target_modules=[q_proj,k_proj,v_proj]")).prepare(
            Qwen2ForCausalLM(qcfg), ctx)
    method = build_method(method_cfg("ssf", "method.target_modules=[q_proj,k_proj,v_proj]", "method.norms=false"))
    qwen = method.prepare(Qwen2ForCausalLM(qcfg), ctx)
    with torch.no_grad():
        for n, p in qwen.named_parameters():
            if "ssf_" in n:
                p.add_(0.1 * torch.randn_like(p))
    method.export(qwen, tmp_path / "qwen")
    batch = probe_batch()
    got = logits_of(Qwen2ForCausalLM.from_pretrained(tmp_path / "qwen"), batch)
    assert (got - logits_of(qwen, batch)).abs().max() <= RELOAD_ATOL


@pytest.mark.parametrize("tied", [False, True])
def test_ssf_after_norms_and_embedding_folds_exactly(tied, tmp_path):
    """Scales and shifts after each block's norms, the embedding and (scale) the final norm, as the official code
    inserts them, fold exactly: a norm's scale into its weight, its shift into the biases of the q/k/v (gate/up)
    projections it feeds, before their own scale/shift; the embedding's into its rows (tied embeddings are untied in
    the export). A shift after the final norm would need an LM-head bias: refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def base():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                            num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=tied)).eval()

    ctx = MethodContext(tokenizer=make_tokenizer(), train_rows=[], seed=0)
    method = build_method(method_cfg("ssf"))
    model = method.prepare(base(), ctx)
    batch = probe_batch()
    assert (logits_of(model, batch) - logits_of(base(), batch)).abs().max() == 0  # identity at step 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ssf_" in n:
                p.add_(0.2 * torch.randn_like(p))
    assert model.model.layers[0].input_layernorm.ssf_shift.requires_grad
    assert not hasattr(model.model.norm, "ssf_shift") and model.model.norm.ssf_scale.requires_grad
    method.export(model, tmp_path / "out")
    got = logits_of(LlamaForCausalLM.from_pretrained(tmp_path / "out"), batch)
    assert (got - logits_of(model, batch)).abs().max() <= RELOAD_ATOL
    assert method.report()["export_unties_embeddings"] is tied
    with pytest.raises(ValueError, match="lm_head.*no bias"):
        build_method(method_cfg("ssf", "method.final_norm_shift=true")).prepare(base(), ctx)


def test_method_lr_scale_multiplies_train_lr(tmp_path, capfd):
    """A method YAML's lr_scale (ssf: 10) sets the optimizer's lr to train.lr x lr_scale, logged in the curve and
    said on stderr; lr_scale=1 leaves train.lr."""
    (run,) = check(["method=ssf"])
    assert run.method.lr_scale == 10.0
    t = train_method("ssf", tmp_path / "scaled", "method.lr_scale=10", steps=2, lr=1e-3)
    assert [r["lr"] for r in t.curve] == pytest.approx([1e-2, 1e-2])
    assert "train.lr 0.001 x method.lr_scale 10" in capfd.readouterr().err
    t = train_method("ssf", tmp_path / "plain", steps=2, lr=1e-3)
    assert [r["lr"] for r in t.curve] == pytest.approx([1e-3, 1e-3])
    with pytest.raises(ConfigError, match="method.lr_scale"):
        check(["method=lora", "method.lr_scale=0"])


def test_freeze_bottom_and_layerwise_lr_decay(tmp_path):
    cfg = method_cfg("freeze", "method.train_top=null", "method.freeze_bottom=0", "method.llrd=0.5",
                     "method.train_head=false")
    method = build_method(cfg)
    model = method.prepare(make_model(), MethodContext(tokenizer=make_tokenizer(), train_rows=[], seed=0))
    assert method.layers == [0, 1]
    groups = method.param_groups(model, 0.0)
    assert [g["lr_scale"] for g in groups] == [0.5, 1.0]  # the bottom block trains at half the top's lr
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("model.layers.")}
    with pytest.raises(ConfigError, match="exactly one"):
        method_cfg("freeze", "method.freeze_bottom=1")


def test_freeze_llrd_gives_the_embeddings_the_most_decayed_rate():
    """Layer-wise LR decay counts the input embeddings as the layer below block 0: lr * llrd**n_blocks, below every
    block's rate; the head and final norm, above the top block, train at the full rate (before issue 13 the
    embeddings were in the full-rate group)."""
    cfg = method_cfg("freeze", "method.train_top=null", "method.freeze_bottom=0", "method.llrd=0.5",
                     "method.train_embeddings=true")
    method = build_method(cfg)
    model = method.prepare(make_model(), MethodContext(tokenizer=make_tokenizer(), train_rows=[], seed=0))
    groups = method.param_groups(model, 0.0)
    name = {id(p): n for n, p in model.named_parameters()}
    rate = {name[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert sorted(rate) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == len(rate)  # each trained parameter in exactly one group
    assert rate["model.embed_tokens.weight"] == 0.5 ** LAYERS == min(rate.values())
    assert rate["model.layers.0.mlp.up_proj.weight"] == 0.5 and rate["model.layers.1.mlp.up_proj.weight"] == 1.0
    assert rate["lm_head.weight"] == rate["model.norm.weight"] == 1.0


def test_prompt_tuning_cached_decoding_matches_full_forward():
    """The wrapper prepends the prompt once: step-by-step decoding with a KV cache (left padding, explicit
    positions, as ftlab.models.generate does) gives the logits of one full forward."""
    from ftlab.methods.prompt_tuning import PromptTunedLM

    method = build_method(method_cfg("prompt_tuning", "method.init=text", "method.init_text='ab c'"))
    tok = make_tokenizer()
    model = method.prepare(make_model(), MethodContext(tokenizer=tok, train_rows=[], seed=0))
    assert isinstance(model, PromptTunedLM)
    emb = model.peft_model.word_embeddings.weight
    ids = tok("ab c")["input_ids"]
    assert torch.equal(model.peft_model.prompt_encoder["default"].embedding.weight[0], emb[ids[0]])
    model.eval()
    seq = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        full = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
        assert full.shape[1] == seq.shape[1]
        # left-padded prefix of 3 real tokens, then 3 cached single-token steps
        pad = torch.tensor([[0, 0]])
        ids = torch.cat([pad, seq[:, :3]], 1)
        mask = torch.tensor([[0, 0, 1, 1, 1]])
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        step_logits = [out.logits[:, -1]]
        cache, next_pos = out.cache, pos[:, -1:] + 1  # transformers' cache API (past_key_values is deprecated)
        for t in range(3, 6):
            mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype)], 1)
            out = model(input_ids=seq[:, t:t + 1], attention_mask=mask, position_ids=next_pos,
                        cache=cache, use_cache=True)
            cache, next_pos = out.cache, next_pos + 1
            step_logits.append(out.logits[:, -1])
    got = torch.stack(step_logits, 1)
    assert (got - full[:, 2:6]).abs().max() <= RELOAD_ATOL
    with torch.no_grad():  # ftlab.models.generate's prefill asks for the last position's logits only
        last = model(input_ids=seq, attention_mask=torch.ones_like(seq), logits_to_keep=1).logits
    assert last.shape[1] == 1 and (last[:, 0] - full[:, -1]).abs().max() <= RELOAD_ATOL
    from ftlab.models.generate import greedy_decode

    assert len(greedy_decode(model, tok, ["ab=", "c="], 3, batch_size=2)) == 2


def test_prompt_tuning_vocab_init_draws_frequent_tokens_never_special():
    """init=vocab as Lester et al.: each virtual token starts as the embedding of a token drawn from the 5,000 most
    frequent ones (here: of the training rows), never a special token; seeded. (peft's SAMPLE_VOCAB draws from the
    whole vocabulary: with 16 of 64 ids, landing only on the rows' 7 tokens is practically impossible.)"""
    from ftlab.methods.prompt_tuning import VOCAB_POOL, frequent_token_ids

    tok = make_tokenizer()
    rows = make_rows(32)  # letters a..f and "="
    allowed = set(tok("abcdef=", add_special_tokens=False)["input_ids"])
    assert VOCAB_POOL == 5000 and set(frequent_token_ids(tok, rows)) == allowed
    top = frequent_token_ids(tok, [{"prompt": "aab=", "response": "b"}, {"prompt": "", "response": "c"}], k=2)
    assert top == tok("ab", add_special_tokens=False)["input_ids"]  # a: 2, b: 2, c: 1, = : 1 -> a, b (lower ids)
    special = set(tok.all_special_ids)

    def init(seed, train_rows):
        method = build_method(method_cfg("prompt_tuning"))
        model = method.prepare(make_model(), MethodContext(tokenizer=tok, train_rows=train_rows, seed=seed))
        emb = model.peft_model.word_embeddings.weight
        prompt = model.peft_model.prompt_encoder["default"].embedding.weight
        for j, i in enumerate(method.init_ids):
            assert torch.equal(prompt[j], emb[i])
        return method.init_ids

    ids = init(0, rows)
    assert len(ids) == 4 and set(ids) <= allowed and len(set(ids)) == 4  # 4 virtual tokens, distinct while they last
    assert init(0, rows) == ids and any(init(s, rows) != ids for s in (1, 2, 3))
    default = build_method(check(["method=prompt_tuning"])[0].method)  # 16 virtual tokens > the pool of 7
    default.prepare(make_model(), MethodContext(tokenizer=tok, train_rows=rows, seed=0))
    assert len(default.init_ids) == 16 and set(default.init_ids) <= allowed
    assert default.report()["init_pool"] == {"size": len(allowed), "from": "training rows"}
    assert not set(init(0, [])) & special  # no rows: any non-special token of the vocabulary


def test_unknown_method_knobs_are_refused():
    from hydra.errors import HydraException

    for name in ALL:  # Hydra refuses the override: the key is not in the method's schema
        with pytest.raises(HydraException, match="method.no_such_knob"):
            check([f"method={name}", "method.no_such_knob=1"])
    for name in ("pissa", "lisa"):  # an addition with `+` is refused by ftlab's validation
        with pytest.raises(ConfigError, match="method.no_such_knob"):
            check([f"method={name}", "+method.no_such_knob=1"])
    with pytest.raises(ConfigError, match="reg.no_such_knob"):
        check(["reg=kl", "+reg.no_such_knob=1"])


# ---------------------------------------------------------------------------------------------- regularisers
@pytest.mark.parametrize("kind,name", [("kl", "full"), ("kl", "lora"), ("l2sp", "full"), ("l2sp", "lisa")])
def test_regulariser_zero_at_step0_and_grows(kind, name, tmp_path):
    from ftlab.train.regularisers import build_regulariser

    (run,) = check([f"reg={kind}", "reg.weight=0.5"])
    assert run.reg.kind == kind
    reg = build_regulariser(run.reg)
    t = train_method(name, tmp_path, reg=reg, steps=6)
    regs = [r["reg"] for r in t.curve]
    assert regs[0] == 0.0  # logged on step 1's forward: the model as it starts
    assert all(r > 0 for r in regs[1:]), regs
    assert regs[-1] > regs[1], regs
    if kind == "kl":  # the reference is the untouched base
        assert all(not p.requires_grad for p in reg.ref.parameters())


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    from ftlab.train.regularisers import token_kl

    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    assert token_kl(logits, logits.clone(), labels).item() == 0.0
    assert token_kl(logits, logits + torch.randn_like(logits), labels).item() > 0


def _one_step(name: str, tmp: Path, reg, *extra: str, model=None):
    """prepare + one step of the real loop (lr 1e-2, constant): (method, model, start weights)."""
    tok = make_tokenizer()
    method = build_method(method_cfg(name, *extra))
    model = method.prepare(model if model is not None else make_model(),
                           MethodContext(tokenizer=tok, train_rows=make_rows(), seed=0))
    if reg is not None:
        reg.capture_start(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    encoded = [encode_example(tok, r["prompt"], r["response"], 32) for r in make_rows()]
    tmp.mkdir(parents=True, exist_ok=True)
    train(model, method, Batches(encoded, 8, 0), run_cfg(name, steps=1, lr=1e-2), device="cpu", pad_id=0,
          run_dir=tmp, progress=False, reg=reg)
    return method, model, start


def test_l2sp_is_decoupled_decay_of_the_weight_change(tmp_path):
    """After each AdamW step, dW <- (1 - lr * weight) dW: for full fine-tuning every weight becomes
    theta0 + (1 - c)(theta - theta0) (c = lr x weight; the old loss-term form has zero gradient at the start, so
    its first step equals no regulariser); the term is logged, not added to the loss."""
    from ftlab.train.regularisers import build_regulariser

    (run,) = check(["reg=l2sp", "reg.weight=20"])
    c = 1e-2 * 20
    _, plain, start = _one_step("full", tmp_path / "plain", None)
    reg = build_regulariser(run.reg)
    _, decayed, _ = _one_step("full", tmp_path / "l2sp", reg)
    assert not reg.in_loss
    for n, p in decayed.named_parameters():
        want = start[n] + (1 - c) * (dict(plain.named_parameters())[n] - start[n])
        assert torch.allclose(p, want, atol=1e-7), n
    losses = [json.loads(x) for x in (tmp_path / "l2sp" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert losses[0]["loss"] == ref[0]["loss"] and losses[0]["reg"] == 0.0


def test_l2sp_on_adapters_is_measured_on_dw_not_on_the_factors(tmp_path):
    """LoRA: the decay acts on dW = s B A, B <- (1 - c) B (exact), A untouched (not pulled back to its random init);
    the logged term is weight * 1/2 * mean(dW^2) over the base weights' entries. For a rewriting init (PiSSA:
    dW = s(BA - B0A0)) B's step shrinks dW within A's row space."""
    from ftlab.train.regularisers import build_regulariser

    (run,) = check(["reg=l2sp", "reg.weight=20"])
    c = 1e-2 * 20
    _, plain, _ = _one_step("lora", tmp_path / "plain", None)
    reg = build_regulariser(run.reg)
    _, model, start = _one_step("lora", tmp_path / "l2sp", reg)
    p0 = dict(plain.named_parameters())
    for n, p in model.named_parameters():
        if "lora_B" in n:
            assert torch.allclose(p, (1 - c) * p0[n], atol=1e-7), n
        elif "lora_A" in n:
            assert torch.equal(p, p0[n]), n  # A is not pulled back (at step 1 B = 0 gives it no gradient either)
    assert any("lora_B" in n and not torch.equal(p, start[n]) for n, p in model.named_parameters())

    def dw_mean(m):
        total, entries = 0.0, 0
        for mod in m.modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                dw = mod.get_delta_weight("default")
                total += dw.pow(2).sum().item()
                entries += mod.base_layer.weight.numel()
        return 0.5 * total / entries

    batch = {k: v for k, v in probe_batch().items()}
    out = SimpleNamespace(hidden=torch.zeros(1))
    assert reg.value(model, batch, out).item() == pytest.approx(dw_mean(model), rel=1e-5)
    with torch.no_grad():  # A moved away from its init: the decay leaves it there, and halves B (c = 0.5)
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.add_(0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg.after_step(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5 / 20))
    for n, p in model.named_parameters():
        assert torch.allclose(p, 0.5 * before[n] if "lora_B" in n else before[n], atol=1e-7), n

    reg = build_regulariser(run.reg)
    method = build_method(method_cfg("pissa"))
    pissa = method.prepare(make_model(), MethodContext(tokenizer=make_tokenizer(), train_rows=make_rows(), seed=0))
    reg.capture_start(pissa)
    assert reg.value(pissa, batch, out).item() < 1e-12  # base + B0A0 = W: no change yet
    lin = pissa.base_model.model.model.layers[0].self_attn.q_proj
    b0a0 = lin.get_delta_weight("default").detach().clone()
    with torch.no_grad():
        for n, p in pissa.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    before = (lin.get_delta_weight("default") - b0a0).norm().item()
    opt = torch.optim.SGD([p for p in pissa.parameters() if p.requires_grad], lr=0.5 / 20)  # c = 0.5
    reg.after_step(pissa, opt)
    after = (lin.get_delta_weight("default") - b0a0).norm().item()
    assert after == pytest.approx(0.5 * before, rel=1e-4)  # A unchanged, dW in A's row space: exactly halved


def test_l2sp_weight_means_the_same_across_model_sizes():
    """The same per-entry change on a model twice as wide logs the same term and decays at the same rate."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftlab.train.regularisers import build_regulariser

    (run,) = check(["reg=l2sp", "reg.weight=2"])
    got = []
    for hidden in (32, 64):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                             num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2))
        reg = build_regulariser(run.reg)
        reg.capture_start(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        value = reg(model, {}, SimpleNamespace(hidden=torch.zeros(1))).item()
        reg.after_step(model, torch.optim.SGD(model.parameters(), lr=0.1))
        w = model.model.layers[0].mlp.down_proj.weight
        got.append((value, (w - reg.anchors["model.layers.0.mlp.down_proj.weight"]).mean().item()))
    assert got[0][0] == pytest.approx(got[1][0]) == pytest.approx(2 * 0.5 * 1e-4, rel=1e-4)
    assert got[0][1] == pytest.approx(got[1][1]) == pytest.approx(0.01 * (1 - 0.1 * 2), rel=1e-4)


def test_kl_on_general_rows(tmp_path):
    """reg.kl_on=mix: the KL is on a batch of general rows (data.mix's source, here data.mix_source), as many as
    the training batch, in a seeded order; both = task + mix; zero while the model equals the base."""
    from ftlab.config.schema import DataConfig
    from ftlab.train.batches import collate
    from ftlab.train.regularisers import build_regulariser, token_kl

    text = tmp_path / "general.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("abc def", "12 = 21", "fed cba", "a1 b2 c3")))
    tok = make_tokenizer()
    ctx = MethodContext(tokenizer=tok, train_rows=make_rows(), seed=0, max_length=32,
                        data=DataConfig(name="x", mix_source=str(text)))
    batch = probe_batch()
    regs, values = {}, {}
    for on in ("task", "mix", "both"):
        (run,) = check(["reg=kl", f"reg.kl_on={on}"])
        reg = build_regulariser(run.reg)
        base = make_model()
        reg.capture_base(base)
        reg.capture_start(base, ctx)
        zero = reg.value(base, batch, SimpleNamespace(hidden=base(**{k: batch[k] for k in (
            "input_ids", "attention_mask")}).logits, head=None)).item()
        assert zero == 0.0, on
        model = make_model()
        with torch.no_grad():
            model.lm_head.weight.add_(0.3 * torch.randn_like(model.lm_head.weight))
        reg.pos = 0
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        values[on] = reg.value(model, batch, SimpleNamespace(hidden=logits, head=None))
        regs[on] = reg
    n = batch["input_ids"].shape[0]
    g = collate([regs["mix"].general[regs["mix"].order[k]] for k in range(n)], 0)
    with torch.no_grad():
        want_mix = token_kl(model(input_ids=g["input_ids"], attention_mask=g["attention_mask"]).logits,
                            regs["mix"].ref(input_ids=g["input_ids"], attention_mask=g["attention_mask"]).logits,
                            g["labels"])
    assert values["mix"].item() == pytest.approx(want_mix.item(), rel=1e-5)
    assert values["both"].item() == pytest.approx(values["task"].item() + values["mix"].item(), rel=1e-5)
    assert values["mix"].requires_grad  # it trains the model: gradients flow through the general rows' forward
    assert regs["mix"].state_dict() == {"pos": n}


# ---------------------------------------------------------------------------------------------- continual replay
def test_continual_replay_previous_replays_earlier_stages_rows(tmp_path, monkeypatch):
    """data.replay_previous=f: stage i > 0 trains on its own n rows plus round(n f / (1 - f)) rows of stages 0..i-1,
    spread evenly over them, drawn from their training rows (seeded); stage 0 replays nothing. Refused for a single
    run and above 0.9."""
    import ftlab.continual as continual
    import ftlab.eval.evaluate
    import ftlab.train.loop

    (cfg,) = check(["data=[synth_sub,synth_rot1]", "data.replay_previous=0.25", "data.n_train=40", "data.mix=0"])
    assert [s.replay_previous for s in cfg.stages] == [0.25] * 2
    seen, replayed = [], []
    real_replay = continual.replay_rows

    def spy_replay(earlier, n, seed, stage):
        out = real_replay(earlier, n, seed, stage)
        replayed.append((stage, [name for name, _ in earlier], out))
        return out

    def fake_train(model, method, batches, settings, **kw):
        seen.append(len(batches.encoded))
        return ftlab.train.loop.TrainResult(steps=1, tokens=1, tokens_per_s=1.0, peak_mem_bytes=0, trainable_params=1,
                                            total_params=1, wall_s=0.0, final_loss=0.0)

    monkeypatch.setattr(continual, "replay_rows", spy_replay)
    monkeypatch.setattr(ftlab.train.loop, "train", fake_train)
    monkeypatch.setattr(ftlab.eval.evaluate, "evaluate", lambda *a, **k: {s.name: {"score": 0.0} for s in cfg.stages})
    method = SimpleNamespace(on_stage_start=lambda model, i: None)
    log = continual.train_stages(cfg, make_model(), method, make_tokenizer(), [], None, run_dir=tmp_path,
                                 progress=False)
    assert seen == [40, 40 + 13]  # round(40 * 0.25 / 0.75) = 13
    assert [r["replayed_rows"] for r in log] == [0, 13]
    (s0, e0, r0), (s1, e1, r1) = replayed
    assert (s0, e0, r0) == (0, [], [])
    assert e1 == ["synth_sub"] and len(r1) == 13
    from ftlab.data.sources import load_train

    own = {(r["prompt"], r["response"]) for r in load_train(cfg.stages[0], cfg.seed)}
    assert all((r["prompt"], r["response"]) in own and r["id"].startswith("replay:synth_sub:") for r in r1)
    assert len({r["id"] for r in r1}) == 13  # without replacement while rows last

    rows = {n: [{"id": f"{n}{k}", "prompt": n, "response": str(k)} for k in range(5)] for n in ("a", "b")}
    three = continual.replay_rows([("a", rows["a"]), ("b", rows["b"])], 13, 0, 2)
    assert [sum(r["id"].startswith(f"replay:{n}:") for r in three) for n in "ab"] == [7, 6]  # evenly, a first
    assert three == continual.replay_rows([("a", rows["a"]), ("b", rows["b"])], 13, 0, 2)  # seeded
    assert {r["id"] for r in three if r["id"].startswith("replay:b:")} == {f"replay:b:b{k}" for k in range(5)}
    assert len({r["id"] for r in [r for r in three if r["id"].startswith("replay:b:")][:5]}) == 5  # no early repeat
    with pytest.raises(ConfigError, match="data.replay_previous.*single run"):
        check(["data.replay_previous=0.2"])
    with pytest.raises(ConfigError, match=r"data.replay_previous: must be in \[0, 0.9\]"):
        check(["data=[synth_sub,synth_rot1]", "data.replay_previous=0.95"])


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def local_model_dir(tmp_path_factory):
    """A tiny Llama + printable-ASCII char tokenizer saved as a local model directory: a real run without
    building the synthetic world."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("local_llama")
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    ct = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    ct.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    ct.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=ct, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(d)
    cfg = LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.mark.parametrize("method,reg", [("hft", "l2sp"), ("corda", "kl")])
def test_runner_end_to_end_new_method_with_reg(method, reg, tmp_path, local_model_dir, monkeypatch):
    """A real run through ftlab.pipeline (local model dir, jsonl data, target eval): result.json reports the
    parameter counts, metrics.jsonl the reg term (0 at the first step), and the final checkpoint reloads."""
    from ftlab.pipeline import run_from_dir
    from ftlab.rundir.layout import prepare_run_dir

    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "cache"))
    fixture = Path(__file__).parent / "fixtures" / "gsm8k_mini.jsonl"
    (cfg,) = check([f"method={method}", f"reg={reg}", f"model.name_or_path={local_model_dir}", "data=gsm8k",
                    f"data.path={fixture}", "eval=target", "eval.limit=2", "data.max_new_tokens=2",
                    "model.max_length=null", "train.max_steps=4", "train.batch_size=4", "train.log_every=1",
                    "train.warmup_steps=0", "hw.num_threads=1", *ROW[method].overrides])
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, cfg)
    result = run_from_dir(run_dir, progress=False)
    assert result["status"] == "completed"
    tr = result["train"]
    assert 0 < tr["trainable_params"] < tr["total_params"]
    curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [1, 2, 3, 4]
    if reg == "l2sp" or not ROW[method].rewrites_base:
        assert curve[0]["reg"] == 0.0
    else:  # the rewritten base + adapter equals the original only up to float rounding
        assert curve[0]["reg"] < 1e-6
    assert curve[-1]["reg"] > curve[0]["reg"]
    final = run_dir / "checkpoints" / "final"
    if method == "hft":
        assert (final / "hft_selection.json").is_file()
    else:
        assert json.loads((final / "adapter_config.json").read_text())["r"] == 2 * cfg.method.r


@pytest.mark.parametrize("method", ["owlore", "lift", "s2ft", "ssf"])
def test_runner_end_to_end_records_method_and_optimizer_state(method, tmp_path, local_model_dir, monkeypatch):
    """A real run of each method added with the optimizer-state column: result.json's train section carries
    trainable/total params, the optimizer-state peak and the method's own record; the final checkpoint is a
    plain model that transformers reloads."""
    from transformers import AutoModelForCausalLM

    from ftlab.pipeline import run_from_dir
    from ftlab.rundir.layout import prepare_run_dir

    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "cache"))
    fixture = Path(__file__).parent / "fixtures" / "gsm8k_mini.jsonl"
    (cfg,) = check([f"method={method}", f"model.name_or_path={local_model_dir}", "data=gsm8k",
                    f"data.path={fixture}", "eval=target", "eval.limit=2", "data.max_new_tokens=2",
                    "model.max_length=null", "train.max_steps=3", "train.batch_size=4", "train.warmup_steps=0",
                    "hw.num_threads=1", *ROW[method].overrides])
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, cfg)
    result = run_from_dir(run_dir, progress=False)
    assert result["status"] == "completed"
    tr = json.loads((run_dir / "result.json").read_text())["train"]
    assert 0 < tr["trainable_params"] < tr["total_params"]
    assert 0 < tr["optimizer_state_bytes"] < 8 * tr["total_params"]
    assert tr["method"]  # the method's record, e.g. {"galore": false, ...} for owlore
    if method == "owlore":
        assert isinstance(tr["method"]["galore"], bool) and tr["method"]["galore_note"]
    AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "final")
