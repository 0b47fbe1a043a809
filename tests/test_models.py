"""ftlab.models.loading: local-dir loading, refusal of pickle checkpoints, fast hub failure, the probe, fingerprints.

No test touches the network: hub tests run in offline mode, or against a closed network (skipped when the hub
is reachable), or against a local socket standing in for the hub endpoint.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

import ftlab.models.hub as fm
import ftlab.utils.files
from ftlab.config.schema import ModelConfig
from ftlab.models.hub import HubUnavailable, hub_status
from ftlab.models.loading import load_model_and_tokenizer, model_fingerprint

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 .,:?#+-=\n"))
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def make_tokenizer(pad: bool = False, **kw):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    ct = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    ct.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    ct.decoder = decoders.Fuse()
    if pad:
        kw["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=ct, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **kw)


def make_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                      attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    model = make_model()
    model.save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d, model


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch, tmp_path):
    """Offline by default, an empty HF cache, no proxies, and a fresh probe for every test."""
    import huggingface_hub.constants as hh

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hh, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    fm._probe_cache.clear()
    yield
    fm._probe_cache.clear()


def _online_env(monkeypatch):
    """Remove every offline switch (environment and the flags the hub libraries read at import)."""
    import huggingface_hub.constants as hh

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hh, "HF_HUB_OFFLINE", False)
    try:
        import datasets.config as dc

        monkeypatch.setattr(dc, "HF_HUB_OFFLINE", False)
    except ImportError:  # pragma: no cover
        pass


IDS = torch.tensor([[1, 10, 11, 12, 13, 14, 15], [1, 20, 21, 22, 23, 24, 25]])


# ------------------------------------------------------------------------------------------------ local dirs
def test_local_dir_round_trip(tiny_dir):
    d, original = tiny_dir
    model, tok = load_model_and_tokenizer(ModelConfig(name="local", name_or_path=str(d)))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, original(IDS).logits)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == "eager"
    # the tokenizer had no pad token: it gets eos, and what was loaded is recorded
    assert tok.pad_token == "</s>" and tok.pad_token_id == 2
    assert tok.ftlab_info == {"padding_side": "right", "pad_token_added": False, "source": str(d),
                              "prompt_format": "plain", "model_context": original.config.max_position_embeddings}
    assert model.config.pad_token_id == 2
    assert model.ftlab_source == str(d)
    assert tok.decode(tok("ab 12")["input_ids"]) == "ab 12"


def test_local_dir_passes_safe_kwargs(tiny_dir, monkeypatch):
    """dtype (not the deprecated torch_dtype), use_safetensors, and trust_remote_code off unless configured."""
    from transformers import AutoModelForCausalLM

    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = load_model_and_tokenizer(ModelConfig(name="local", name_or_path=str(tiny_dir[0]), dtype="bfloat16"))
    assert seen["dtype"] is torch.bfloat16 and "torch_dtype" not in seen
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False
    assert seen["attn_implementation"] == "eager"
    assert next(model.parameters()).dtype == torch.bfloat16


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_dir, monkeypatch):
    """Choice: a directory with only pytorch_model.bin is refused before anything is unpickled."""
    d = tmp_path / "bin_only"
    d.mkdir()
    shutil.copy(tiny_dir[0] / "config.json", d)
    torch.save(tiny_dir[1].state_dict(), d / "pytorch_model.bin")

    def no_unpickling(*a, **kw):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors"):
        load_model_and_tokenizer(ModelConfig(name="local", name_or_path=str(d)))


def test_local_dir_without_config_or_weights(tmp_path, tiny_dir):
    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    shutil.copy(tiny_dir[0] / "model.safetensors", no_cfg)
    with pytest.raises(FileNotFoundError, match=r"no config\.json.*model\.safetensors"):
        load_model_and_tokenizer(ModelConfig(name="x", name_or_path=str(no_cfg)))

    no_w = tmp_path / "no_weights"
    no_w.mkdir()
    shutil.copy(tiny_dir[0] / "config.json", no_w)
    with pytest.raises(FileNotFoundError, match=r"no weights"):
        load_model_and_tokenizer(ModelConfig(name="x", name_or_path=str(no_w)))

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(ModelConfig(name="x", name_or_path=str(tmp_path / "missing" / "dir")))


def test_tokenizer_with_pad_keeps_it(tmp_path, tiny_dir):
    d = tmp_path / "padded"
    shutil.copytree(tiny_dir[0], d)
    make_tokenizer(pad=True, padding_side="left").save_pretrained(d)
    _, tok2 = load_model_and_tokenizer(ModelConfig(name="x", name_or_path=str(d)))
    assert tok2.pad_token == "<pad>" and tok2.ftlab_info["padding_side"] == "left"


# ------------------------------------------------------------------------------------------------------ hub
def _assert_fast_hub_failure(name: str):
    t0 = time.monotonic()
    with pytest.raises(HubUnavailable) as ei:
        load_model_and_tokenizer(ModelConfig(name="hub", name_or_path=name))
    elapsed = time.monotonic() - t0
    msg = str(ei.value)
    assert name in msg and "model.name_or_path=/local/dir" in msg
    assert elapsed < 5.0, f"took {elapsed:.1f} s"
    return elapsed, msg


def test_hub_id_offline_fails_fast():
    elapsed, msg = _assert_fast_hub_failure("Qwen/Qwen2.5-0.5B")
    assert "offline mode" in msg and isinstance(HubUnavailable("x"), RuntimeError)


def test_hub_id_no_offline_variables_closed_network_fails_fast(monkeypatch):
    """NO OFFLINE VARIABLES: the real probe against the real endpoint, on a machine without network.

    Without the probe this call retries for ~23 s (46 s for the tokenizer). Skipped where the hub is reachable,
    because it would then download the model."""
    _online_env(monkeypatch)
    if hub_status(use_cache=False)[0]:
        pytest.skip("the hub is reachable from here; this test covers a closed network")
    fm._probe_cache.clear()
    elapsed, msg = _assert_fast_hub_failure("HuggingFaceTB/SmolLM2-135M")
    assert "unreachable" in msg


def test_hub_cache_still_loads_offline(tmp_path, tiny_dir):
    """A hub id already in the local HF cache loads without the network (offline mode, cache only)."""
    import huggingface_hub.constants as hh

    repo = Path(hh.HF_HUB_CACHE) / "models--ftlab-test--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dir[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    t0 = time.monotonic()
    model, tok = load_model_and_tokenizer(ModelConfig(name="hub", name_or_path="ftlab-test/tiny-llama"))
    assert time.monotonic() - t0 < 5.0
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, tiny_dir[1](IDS).logits)
    assert model.ftlab_source == "ftlab-test/tiny-llama"


def _listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    return srv, srv.getsockname()[1]


def test_probe_reachable_endpoint(monkeypatch):
    _online_env(monkeypatch)
    srv, port = _listener()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub_status(use_cache=False) == (True, f"http://127.0.0.1:{port}")
    finally:
        srv.close()


def test_probe_goes_through_https_proxy(monkeypatch):
    _online_env(monkeypatch)
    srv, port = _listener()
    try:
        monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
        assert hub_status(use_cache=False)[0] is True
    finally:
        srv.close()


def test_probe_refused_and_hanging(monkeypatch):
    _online_env(monkeypatch)
    srv, port = _listener()
    srv.close()  # nothing listens there now: connection refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    online, why = hub_status(use_cache=False)
    assert not online and "unreachable" in why

    # a connect that never returns (e.g. a DNS lookup that hangs) is cut off at the timeout
    def hang(*a, **kw):  # then fail as a real timeout would, so the abandoned probe thread ends quietly
        time.sleep(10)
        raise OSError("timed out")

    monkeypatch.setattr(fm.socket, "create_connection", hang)
    t0 = time.monotonic()
    online, why = hub_status(use_cache=False, timeout=0.5)
    assert not online and "no answer within 0.5 s" in why
    assert time.monotonic() - t0 < 1.5


def test_offline_variables_skip_the_probe(monkeypatch):
    monkeypatch.setattr(fm, "_connect", lambda *a: pytest.fail("probe must not run in offline mode"))
    assert hub_status() == (False, "offline mode is on (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE)")
    _online_env(monkeypatch)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub_status(datasets=True)[0] is False


# ------------------------------------------------------------------------------------------------ fingerprint
def test_fingerprint_stable_and_sensitive(tmp_path, tiny_dir):
    d, original = tiny_dir
    fp_dir = model_fingerprint(d)
    assert len(fp_dir) == 64 and fp_dir == model_fingerprint(str(d))
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    ftlab.utils.files._digest_cache.clear()
    assert model_fingerprint(copy) == fp_dir  # content, not location

    m1, _ = load_model_and_tokenizer(ModelConfig(name="x", name_or_path=str(d)))
    m2, _ = load_model_and_tokenizer(ModelConfig(name="x", name_or_path=str(copy)))
    fp_mem = model_fingerprint(m1)
    assert fp_mem == model_fingerprint(m2) == model_fingerprint(original)
    assert fp_mem == model_fingerprint(m1.state_dict())

    with torch.no_grad():
        m2.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(m2) != fp_mem
    m2.save_pretrained(copy)
    assert model_fingerprint(copy) != fp_dir

    assert model_fingerprint(m1.to(torch.bfloat16)) != fp_mem
    with pytest.raises(FileNotFoundError):
        model_fingerprint(tmp_path / "nothing")
