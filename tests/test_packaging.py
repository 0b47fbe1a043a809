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
