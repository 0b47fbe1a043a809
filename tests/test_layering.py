"""The layering of ftlab, checked on every import statement (module level and inside functions) with `ast`.

    cli, hydra_plugins  ->  launch  ->  pipeline, continual  ->  train, eval, methods, data, models, world, report
        ->  rundir  ->  config  ->  utils, kernels, ftlab (the package root)

A module imports only modules of its own layer or below; within a layer there are no import cycles (and none
anywhere). Besides: only the CLI and hydra_plugins import Hydra or submitit; config imports neither torch nor the
CLI; methods never import the training loop, and the loop names no method; kernels/ imports nothing from ftlab.
A run-time check that worker processes never load Hydra is in test_dist.py and test_slurm.py.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [  # lowest first; a prefix names a package or a module
    ("ftlab", "ftlab.utils", "ftlab.kernels"),
    ("ftlab.config",),
    ("ftlab.rundir",),
    ("ftlab.train", "ftlab.eval", "ftlab.methods", "ftlab.data", "ftlab.models", "ftlab.world", "ftlab.report",
     "ftlab.post"),
    ("ftlab.pipeline", "ftlab.continual"),
    ("ftlab.launch",),
    ("ftlab.cli", "ftlab.__main__", "hydra_plugins"),
]
HYDRA = ("hydra", "submitit", "hydra_plugins")
HEAVY = ("torch", "transformers", "peft", "datasets", "triton", "lm_eval", "wandb")


@dataclass(frozen=True)
class Edge:
    src: str  # importing module
    dst: str  # imported module (an ftlab module, or a top-level third-party name)
    line: int
    internal: bool


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] == "kernels":  # installed as ftlab.kernels (pyproject package-dir)
        parts = ["ftlab", "kernels", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_modules(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for base in ("ftlab", "kernels", "hydra_plugins"):
        for p in sorted((root / base).rglob("*.py")):
            mods[module_name(p, root)] = p
    return mods


def edges(mods: dict[str, Path]) -> list[Edge]:
    """Every import of every module, resolved to the ftlab module it names (the longest existing prefix) or to
    the third-party top-level package."""
    out = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                top = t.split(".")[0]
                if top in ("ftlab", "hydra_plugins") and not t.startswith("hydra_plugins.hydra_submitit"):
                    m = t
                    while m and m not in mods:
                        m = m.rpartition(".")[0]
                    if m and m != name:
                        out.append(Edge(name, m, node.lineno, True))
                else:
                    out.append(Edge(name, "hydra_plugins" if top == "hydra_plugins" else top, node.lineno, False))
    return sorted(set(out), key=lambda e: (e.src, e.dst, e.line))


def layer_of(mod: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{mod}: in no layer of tests/test_layering.py LAYERS"
    return rank


def cycles(mods, es: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: sorted({e.dst for e in es if e.internal and e.src == m}) for m in mods}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def violations(mods: dict[str, Path]) -> list[str]:
    es = edges(mods)
    bad = []
    for e in es:
        where = f"{e.src} (line {e.line}) imports {e.dst}"
        in_cli = e.src.startswith(("ftlab.cli", "hydra_plugins"))
        if not e.internal and e.dst in HYDRA and not in_cli:
            bad.append(f"{where}: only ftlab.cli and hydra_plugins may import Hydra or submitit")
        if e.src.startswith("ftlab.config") and (e.dst in HEAVY or e.dst.startswith("ftlab.cli")):
            bad.append(f"{where}: config code imports neither torch (nor other heavy packages) nor the CLI")
        if e.src.startswith("ftlab.methods") and e.dst == "ftlab.train.loop":
            bad.append(f"{where}: methods never import the training loop")
        if e.src == "ftlab.train.loop" and e.dst.startswith("ftlab.methods.") and e.dst != "ftlab.methods.base":
            bad.append(f"{where}: the loop names no method")
        if e.src.startswith("ftlab.kernels") and e.internal and not e.dst.startswith("ftlab.kernels"):
            bad.append(f"{where}: kernels/ imports nothing from ftlab")
        if e.internal and layer_of(e.dst) > layer_of(e.src):
            bad.append(f"{where}: an import upwards (layer {layer_of(e.src)} -> {layer_of(e.dst)})")
    for c in cycles(mods, es):
        bad.append(f"import cycle: {' -> '.join(c)}")
    return bad


def test_layering_holds():
    bad = violations(source_modules())
    assert not bad, "\n".join(bad)


def registered_methods(root: Path = ROOT) -> set[str]:
    """The names of `@METHODS.register("name", ...)` in ftlab/methods/*.py, read with ast (no import)."""
    names = set()
    for path in (root / "ftlab" / "methods").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "METHODS" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                names.add(node.args[0].value)
    return names


def test_the_loop_names_no_method():
    methods = registered_methods()
    assert {"full", "lora", "hft", "lisa"} <= methods, methods  # the reader finds the registrations
    tree = ast.parse((ROOT / "ftlab/train/loop.py").read_text())
    named = sorted({n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in methods})
    assert not named, f"ftlab/train/loop.py names methods {named}: a method's behaviour belongs in its hooks"


@pytest.mark.parametrize("case", ["config_imports_cli", "config_imports_torch", "worker_imports_hydra", "cycle",
                                  "method_imports_loop", "kernels_import_ftlab", "upwards"])
def test_the_checker_catches_each_kind_of_violation(case, tmp_path):
    """Each rule fails on a tree that breaks it (the violations of main before the restructuring, in miniature)."""
    files = {
        "ftlab/__init__.py": "",
        "ftlab/config/__init__.py": "",
        "ftlab/config/schema.py": "import omegaconf\n",
        "ftlab/cli/__init__.py": "import hydra\n",
        "ftlab/launch/__init__.py": "",
        "ftlab/launch/worker.py": "from ftlab import pipeline\n",
        "ftlab/pipeline.py": "from ftlab.train import loop\n",
        "ftlab/train/__init__.py": "",
        "ftlab/train/loop.py": "import torch\nfrom ftlab.methods import base\n",
        "ftlab/methods/__init__.py": "",
        "ftlab/methods/base.py": "from ftlab.config import schema\n",
        "kernels/lora.py": "import triton\n",
    }
    broken = {
        # schema.py imported the CLI to find conf/ (so every torchrun rank imported the CLI module)
        "config_imports_cli": ("ftlab/config/schema.py", "def f():\n    from ftlab.cli import conf_dir\n"),
        "config_imports_torch": ("ftlab/config/schema.py", "import torch\n"),
        # slurm.py loaded the Hydra plugin at module level, so every SLURM job imported Hydra
        "worker_imports_hydra": ("ftlab/launch/worker.py", "from hydra_plugins.ftlab_slurm_launcher import x\n"),
        "cycle": ("ftlab/train/loop.py", "from ftlab.methods import base\ndef f():\n    from ftlab.pipeline import g\n"),
        # methods/base.py and lora_ga.py imported the loop's private helpers
        "method_imports_loop": ("ftlab/methods/base.py", "def f():\n    from ftlab.train.loop import encode\n"),
        "kernels_import_ftlab": ("kernels/lora.py", "from ftlab.config import schema\n"),
        "upwards": ("ftlab/train/loop.py", "from ftlab.launch import worker\n"),
    }
    path, text = broken[case]
    files[path] = files[path] + text
    for rel, content in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(content)
    (tmp_path / "hydra_plugins/ftlab_slurm_launcher").mkdir(parents=True)
    (tmp_path / "hydra_plugins/ftlab_slurm_launcher/__init__.py").write_text("import hydra\n")
    (tmp_path / path).write_text(files[path][: -len(text)])
    assert violations(source_modules(tmp_path)) == []  # the miniature tree is clean without the break
    (tmp_path / path).write_text(files[path])
    assert violations(source_modules(tmp_path)), f"{case}: not caught"


def test_validating_a_config_imports_no_torch_and_no_cli(tmp_path):
    """The config layer at run time: composing is the CLI's job; validating a frozen config (what a worker does
    with config.yaml) loads neither torch nor the CLI nor Hydra, with every method and task name known."""
    # composing probes that the outputs and cache directories are writable (ftlab.cli.inputs.check_places): point
    # them into tmp_path, so the test does not depend on a writable checkout or home directory
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "FTLAB_OUTPUTS": str(tmp_path / "outputs"), "FTLAB_CACHE": str(tmp_path / "cache")}
    path = tmp_path / "config.yaml"
    compose = ("import sys, yaml\n"
               "from ftlab.cli.run import check\n"
               "from ftlab.config.schema import to_container\n"
               "open(sys.argv[1], 'w').write(yaml.safe_dump(to_container(check(['method=owlore'])[0])))\n")
    p = subprocess.run([sys.executable, "-c", compose, str(path)], capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    code = ("import sys, yaml\n"
            "from ftlab.config.validate import validate\n"
            "run = validate(yaml.safe_load(open(sys.argv[1]).read()))\n"
            "bad = [m for m in ('torch', 'transformers', 'peft', 'hydra', 'ftlab.cli') if m in sys.modules]\n"
            "print(run.method.name, bad)\n")
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["owlore", "[]"]


def test_ruff_is_clean():
    """The linter config in pyproject.toml holds on the whole tree (ruff is in the dev extra)."""
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "ftlab", "kernels", "hydra_plugins",
                        "scripts", "tests"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-1000:]
