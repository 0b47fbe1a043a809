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
from typing import Any

# top-level keys outside the identity: they move or mirror results, never change them
EXCLUDED = ("out_dir", "logger")
DIGEST_CHARS = 10  # 40 bits: a collision among a million runs has odds ~5e-7


def identity_payload(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in EXCLUDED}


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
