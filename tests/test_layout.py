"""The repo's kernels/ folder must never be importable as a top-level `kernels` (a PyPI package has that
name and transformers probes for it): it is installed as ftlab.kernels instead."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_folder_has_no_init():
    assert (ROOT / "kernels").is_dir()
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_repo_kernels_does_not_shadow_an_installed_kernels_package(tmp_path):
    # A stand-in for the PyPI package, placed on sys.path AFTER the repo root: a real package must win over the
    # repo's folder (the stand-in, or the PyPI package itself where it is installed: transformers 5 requires it).
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '9.9.9'\n")
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; sys.path.append(sys.argv[2]); import kernels; "
            "print(kernels.__file__)")
    p = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "site")], capture_output=True,
                       text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    found = Path(p.stdout.strip()).resolve()
    assert found.name == "__init__.py" and ROOT / "kernels" not in found.parents, found


def test_transformers_does_not_see_a_kernels_package_from_the_repo_root():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from transformers.utils.import_utils import is_kernels_available; print(is_kernels_available())")
    p = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    installed = subprocess.run([sys.executable, "-m", "pip", "show", "kernels"], capture_output=True).returncode == 0
    assert p.stdout.strip().endswith(str(installed)), p.stdout + p.stderr


def test_ftlab_kernels_is_importable():
    import ftlab.kernels  # noqa: F401
