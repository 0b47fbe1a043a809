"""A run's identity is its config: the same validated config always maps to the same run directory.

So `ftlab run` of a config that already completed returns its record instead of training again, a resubmitted
sweep skips its finished jobs and resumes the partial ones from their checkpoints, and two different configs never
share a directory. Keys that cannot change a result (where outputs go, where metrics are logged) are left out, so
switching the logger on for a resubmission continues the same run.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ftlab.config.files import CONFIG

# keys outside the identity: they move, schedule or mirror results, never change them (hw.slurm: a resubmission
# with a longer time limit or another partition continues the same runs)
EXCLUDED = ("out_dir", "logger", "hw.slurm")
DIGEST_CHARS = 10  # 40 bits: a collision among a million runs has odds ~5e-7


class ResumeRefused(RuntimeError):
    """The run directory's record or checkpoint cannot be continued with the current config."""


def _excluded(key: str) -> bool:
    return any(key == e or key.startswith(e + ".") for e in EXCLUDED)


def identity_payload(config: dict, prefix: str = "") -> dict:
    return {k: identity_payload(v, f"{prefix}{k}.") if isinstance(v, dict) else v
            for k, v in config.items() if not _excluded(prefix + k)}


def config_digest(config: dict) -> str:
    """sha256 of the canonical JSON of the identity part of a resolved config (a plain dict, as config.yaml)."""
    text = json.dumps(identity_payload(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _slug(x: Any) -> str:
    names = x if isinstance(x, (list, tuple)) else [x]
    return "+".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(n)).strip("-") or "x" for n in names)


def run_name(config: dict) -> str:
    """`<method>_<data>_s<seed>_<digest>`: readable first, unique by the digest."""
    data = config.get("stages") or config.get("data", {})  # a continual run: every stage's name
    data_name = [s.get("name", "data") for s in data] if isinstance(data, list) else data.get("name", "data")
    return (f"{_slug(config['method']['name'])}_{_slug(data_name)}_s{config.get('seed', 0)}_"
            f"{config_digest(config)[:DIGEST_CHARS]}")


def config_sha256(run_dir: Path) -> str | None:
    """The identity digest of run_dir/config.yaml (None when there is none). No torch import: submitting stays fast."""
    import yaml

    p = Path(run_dir) / CONFIG
    return config_digest(yaml.safe_load(p.read_text()) or {}) if p.is_file() else None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_changes(old_yaml: str, new_yaml: str) -> list[str]:
    """`key: old -> new` for every leaf inside the identity that differs between two config.yaml texts."""
    import yaml

    a, b = _flatten(yaml.safe_load(old_yaml) or {}), _flatten(yaml.safe_load(new_yaml) or {})

    def show(d: dict, k: str) -> str:
        return repr(d[k]) if k in d else "(absent)"

    return [f"{k}: {show(a, k)} -> {show(b, k)}" for k in sorted(set(a) | set(b))
            if (k not in a or k not in b or a[k] != b[k]) and not _excluded(k)]
