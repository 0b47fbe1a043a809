"""ftlab installs as a wheel that carries its configs: `ftlab run` composes from the installed package,
not from a source checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_conf_and_finds_it_when_installed(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                        "-w", str(tmp_path / "dist")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("ftlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("ftlab/conf/config.yaml", "ftlab/conf/model/tiny.yaml", "ftlab/conf/method/lora.yaml",
              "ftlab/conf/method/full.yaml"):
        assert f in names
    # every module of the source tree is in the wheel (pyproject lists the packages by hand)
    for src in (ROOT / "ftlab").rglob("*.py"):
        rel = src.relative_to(ROOT).as_posix()
        if rel.startswith("ftlab/kernels/"):  # the wheel maps the top-level kernels/ there instead
            continue
        assert rel in names, f"{rel} is missing from the wheel: add its package to [tool.setuptools] packages"
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels package would shadow PyPI's"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import ftlab.config.conf as c; d = c.conf_dir(); "
            "import ftlab.cli.run as r; print(d); runs = r.check(['method=full']); print(runs[0].method.name)")
    p = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    conf, method = p.stdout.split()
    assert conf.startswith(str(site)) and method == "full"


def test_the_environment_has_exactly_the_tested_versions():
    """constraints.txt names the versions CI tests with (.ci/run and the README install under it); pyproject's
    ranges must allow them, and what is installed must be them."""
    import importlib.metadata as md
    import re

    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    assert {"torch", "transformers", "peft"} <= set(pins)
    for name, version in pins.items():
        installed = md.version(name).split("+")[0]
        assert installed == version, f"{name}: installed {installed}, constraints.txt pins {version}"
    text = (ROOT / "pyproject.toml").read_text()
    for dep in re.findall(r'^\s+"([^"]+)",', text, re.M):
        req = Requirement(dep)
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in pins:
            assert req.specifier.contains(pins[key]), f"pyproject {dep!r} excludes the tested {pins[key]}"
    for key in ("transformers", "peft"):
        spec = next(Requirement(d).specifier for d in re.findall(r'^\s+"([^"]+)",', text, re.M)
                    if Requirement(d).name == key)
        assert any(s.operator == "<" for s in spec), f"{key} needs an upper bound in pyproject.toml"
