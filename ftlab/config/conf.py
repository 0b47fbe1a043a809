"""Where ftlab's conf/ tree is, and what its groups offer (read without Hydra)."""

from __future__ import annotations

from pathlib import Path


def conf_dir() -> str:
    """conf/ ships inside the package (ftlab/conf) when installed; in a source checkout it sits beside ftlab/."""
    pkg = Path(__file__).resolve().parents[1]  # ftlab/
    for cand in (pkg / "conf", pkg.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return str(cand)
    raise FileNotFoundError(f"ftlab's conf/ not found next to {pkg}; reinstall ftlab")
