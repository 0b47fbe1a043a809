"""Shared test setup: never touch the network, keep every cache and output inside pytest's tmp dirs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("FTLAB_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # CPU-only machines; must be set before triton is imported

import pytest  # noqa: E402

# A small world that pretrains in a few seconds: enough for the plumbing tests (not for the accuracy budget,
# which tests/test_default_world.py checks on the real default).
SMALL_WORLD = ["model.world.hidden_size=32", "model.world.num_heads=4", "model.world.intermediate_size=128",
               "model.world.steps=200", "model.world.skills=[add,rev,copy,succ,cnt]"]
FAST = SMALL_WORLD + ["train.max_steps=20", "eval.limit=16", "eval.batch_size=16", "data.n_train=256"]


@pytest.fixture(scope="session")
def ftlab_cache(tmp_path_factory):
    """One cache for the session: the small world is built once and shared by every test that needs it."""
    path = tmp_path_factory.mktemp("ftlab_cache")
    os.environ["FTLAB_CACHE"] = str(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: with two on a shared, loaded 2-core machine each small
    parallel region waits for a descheduled thread (~100x slower measured); one is fastest for these sizes anyway."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def outputs(tmp_path, monkeypatch, ftlab_cache):
    out = tmp_path / "outputs"
    monkeypatch.setenv("FTLAB_OUTPUTS", str(out))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    return out


SITECUSTOMIZE = '''
import atexit, json, os, sys

def _ftlab_record_modules():
    out = os.environ.get("FTLAB_TEST_MODULES_DIR")
    if out:
        path = os.path.join(out, f"{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump({"argv": sys.argv, "modules": sorted(m for m in sys.modules if "." not in m)}, f)

atexit.register(_ftlab_record_modules)
'''


@pytest.fixture
def module_probe(tmp_path):
    """Env vars that make every Python process started with them record, at exit, its argv and the top-level
    modules it loaded (a sitecustomize on PYTHONPATH); `read()` returns those records. Test-only: nothing of it
    is in ftlab."""
    site, out = tmp_path / "module_probe_site", tmp_path / "module_probe_out"
    site.mkdir()
    out.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)

    class Probe:
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
               "FTLAB_TEST_MODULES_DIR": str(out)}

        @staticmethod
        def read() -> list[dict]:
            import json

            return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]

    return Probe
