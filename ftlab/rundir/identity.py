"""A run's identity is its config and the content of its input files: the same validated config on the same files
always maps to the same run directory.

So `ftlab run` of a config that already completed returns its record instead of training again, a resubmitted
sweep skips its finished jobs and resumes the partial ones from their checkpoints, and two different configs never
share a directory. Keys that cannot change a result (where outputs go, where metrics are logged) are left out, so
switching the logger on for a resubmission continues the same run.

Input files (`input_files`: data.path, data.eval_path, data.mix_source when it is a file, the same of every
continual stage, eval.paths.*, eval.tasks.*.fewshot_path) enter the name by their sha256: an edited file gets a
new run directory. The run's record (result.json) and every training-state checkpoint store the digests
(`input_digests`), and a directory whose files changed since is neither returned as done nor resumed
(`changed_inputs`; see ftlab.rundir.layout.completed_record and ftlab.train.checkpoint.check_same_config). A config
that reads no local file is named exactly as before input digests existed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from ftlab.config.files import CONFIG
from ftlab.utils.files import sha256_file

# keys outside the identity: they move, schedule or mirror results, never change them (hw.slurm: a resubmission
# with a longer time limit or another partition continues the same runs; post: variants evaluated after training,
# so a completed run given another post evaluates only the new variants, without training again)
EXCLUDED = ("out_dir", "logger", "hw.slurm", "post")
# the readable parts are cut to this length (the digest covers the whole config): a run directory's name stays far
# under the file system's 255-byte limit whatever data.name or the stage list is
NAME_CHARS = 80
DIGEST_CHARS = 10  # 40 bits: a collision among a million runs has odds ~5e-7
# keys added after run names were first given out, left out of the digest while at their default so that the
# directories of existing configs keep their names: (group, key) -> default; "data" covers every stage too
NEUTRAL_DEFAULTS = {("data", "allow_overlap"): False, ("data", "allow_truncation"): False,
                    ("data", "replay_previous"): 0.0, ("data", "stop"): [], ("reg", "kl_on"): "task",
                    ("data", "validation_path"): None, ("eval", "validation"): False, ("eval", "curve_every"): 0,
                    ("eval", "curve_limit"): None, ("data", "packing"): False, ("hw", "compile"): False,
                    ("hw", "kernels"): False}


_MISSING = object()


class ResumeRefused(RuntimeError):
    """The run directory's record or checkpoint cannot be continued with the current config."""


def _excluded(key: str) -> bool:
    return any(key == e or key.startswith(e + ".") for e in EXCLUDED)


def _neutral(key: str, value: Any) -> bool:
    parts = key.split(".")
    group = "data" if parts[0] == "stages" else parts[0]
    default = NEUTRAL_DEFAULTS.get((group, parts[-1]), _MISSING)
    return default is not _MISSING and type(value) is type(default) and value == default


def identity_payload(config: dict, prefix: str = "") -> dict:
    def one(v: Any, at: str) -> Any:
        if isinstance(v, dict):
            return identity_payload(v, at + ".")
        if isinstance(v, list) and at == "stages":
            return [one(x, at) for x in v]
        return v

    return {k: one(v, prefix + k) for k, v in config.items()
            if not _excluded(prefix + k) and not _neutral(prefix + k, v)}


def config_digest(config: dict) -> str:
    """sha256 of the canonical JSON of the identity part of a resolved config (a plain dict, as config.yaml)."""
    text = json.dumps(identity_payload(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _slug(x: Any) -> str:
    names = x if isinstance(x, (list, tuple)) else [x]
    return "+".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(n)).strip("-") or "x" for n in names)


def input_files(config: dict) -> dict[str, str]:
    """`key: path` of every local file a run reads, by the config key that names it: data.path, data.eval_path,
    data.validation_path, data.mix_source (when it is a file and data.mix > 0), the same for continual stages after the first
    (stages.<i>.*; stage 0 is `data`), eval.paths.<task> and eval.tasks.<task>.fewshot_path."""
    out: dict[str, str] = {}

    def data(prefix: str, d: Any) -> None:
        if not isinstance(d, dict):
            return
        for k in ("path", "eval_path", "validation_path"):
            if d.get(k):
                out[f"{prefix}.{k}"] = str(d[k])
        src = d.get("mix_source")
        if src and (d.get("mix") or 0) > 0 and os.path.isfile(os.path.expanduser(str(src))):
            out[f"{prefix}.mix_source"] = str(src)

    data("data", config.get("data"))
    for i, stage in enumerate(config.get("stages") or []):
        if i > 0:
            data(f"stages.{i}", stage)
    ev = config.get("eval") or {}
    for name, p in sorted((ev.get("paths") or {}).items()):
        if p:
            out[f"eval.paths.{name}"] = str(p)
    for name, opts in sorted((ev.get("tasks") or {}).items()):
        if isinstance(opts, dict) and opts.get("fewshot_path"):
            out[f"eval.tasks.{name}.fewshot_path"] = str(opts["fewshot_path"])
    return out


def input_digests(config: dict) -> dict[str, dict]:
    """`{key: {"path": absolute path, "sha256": digest}}` of every input file (`input_files`); sha256 is None for
    a file that cannot be read (the loader says why, with the key)."""
    out = {}
    for key, p in input_files(config).items():
        path = Path(p).expanduser()
        try:
            digest = sha256_file(path)
        except OSError:
            digest = None
        out[key] = {"path": str(path.resolve()), "sha256": digest}
    return out


def hub_inputs(config: dict) -> dict[str, dict]:
    """What a run reads from the hub, as far as the config pins it: `{key: {"hub", "revision", "pinned"}}` for
    training data (data.source=hf without data.path) and a hub mix source; recorded in result.json beside the
    files' digests. A built-in eval task's hub split is recorded with its score (tasks.<name>.source, sha256)."""
    out: dict[str, dict] = {}
    stages = config.get("stages") or []
    for prefix, d in [("data", config.get("data") or {}), *[(f"stages.{i}", s) for i, s in enumerate(stages) if i]]:
        if not isinstance(d, dict):
            continue
        if d.get("source") == "hf" and not d.get("path") and d.get("hf_path"):
            out[f"{prefix}.hf_path"] = {"hub": d["hf_path"] + (f"/{d['hf_name']}" if d.get("hf_name") else ""),
                                        "revision": d.get("revision") or "main", "pinned": bool(d.get("revision"))}
        src = d.get("mix_source")
        if src and (d.get("mix") or 0) > 0 and not os.path.exists(os.path.expanduser(str(src))):
            out[f"{prefix}.mix_source"] = {"hub": str(src) + (f"/{d['mix_name']}" if d.get("mix_name") else ""),
                                           "revision": "main", "pinned": False}
    return out


def changed_inputs(recorded: Any, config: dict) -> list[str]:
    """`key path: sha256 old… -> new…` for every input file of `config` whose content differs from the digests
    `recorded` (result.json's or a checkpoint's `inputs`); [] when `recorded` is None (written before digests
    were recorded) or nothing changed. Only files are compared (entries with a path: not hub pins, not
    `data.rows`)."""
    if not isinstance(recorded, dict):
        return []
    now = input_digests(config)
    out = []
    files = {k: v for k, v in recorded.items() if isinstance(v, dict) and "path" in v and "sha256" in v}

    def short(d: str | None) -> str:
        return f"{d[:12]}…" if d else "(unreadable)"

    for key in sorted(set(now) | set(files)):
        old, new = files.get(key, {}), now.get(key, {})
        if key in files and key in now and old["sha256"] == new["sha256"]:
            continue
        path = new.get("path") or old.get("path")
        if key not in now:
            out.append(f"{key} {path}: no longer an input")
        elif key not in files:
            out.append(f"{key} {path}: a new input")
        else:
            out.append(f"{key} {path}: sha256 {short(old['sha256'])} -> {short(new['sha256'])}")
    return out


def run_digest(config: dict) -> str:
    """The digest in the run directory's name: the config's (`config_digest`), combined with the sha256 of every
    input file when there are any (none: the config's digest alone, so file-less configs keep their names)."""
    digest = config_digest(config)
    inputs = input_digests(config)
    if not inputs:
        return digest
    text = json.dumps({"config": digest, "inputs": {k: v["sha256"] for k, v in inputs.items()}}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def run_name(config: dict) -> str:
    """`<method>_<data>_s<seed>_<digest>`: readable first, unique by the digest (config and input files)."""
    data = config.get("stages") or config.get("data", {})  # a continual run: every stage's name
    data_name = [s.get("name", "data") for s in data] if isinstance(data, list) else data.get("name", "data")
    return (f"{_slug(config['method']['name'])[:NAME_CHARS]}_{_slug(data_name)[:NAME_CHARS]}_s{config.get('seed', 0)}_"
            f"{run_digest(config)[:DIGEST_CHARS]}")


def run_dir_config(run_dir: Path) -> dict | None:
    """run_dir/config.yaml as a plain dict (None when there is none)."""
    import yaml

    p = Path(run_dir) / CONFIG
    return (yaml.safe_load(p.read_text()) or {}) if p.is_file() else None


def config_sha256(run_dir: Path) -> str | None:
    """The identity digest of run_dir/config.yaml (None when there is none). No torch import: submitting stays fast."""
    config = run_dir_config(run_dir)
    return config_digest(config) if config is not None else None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):  # continual stages: stages.<i>.<key>
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: d}


flatten = _flatten  # dotted keys of a config; ftlab.report groups runs by them


def config_changes(old_yaml: str, new_yaml: str) -> list[str]:
    """`key: old -> new` for every leaf inside the identity that differs between two config.yaml texts."""
    import yaml

    a, b = _flatten(yaml.safe_load(old_yaml) or {}), _flatten(yaml.safe_load(new_yaml) or {})

    def show(d: dict, k: str) -> str:
        return repr(d[k]) if k in d else "(absent)"

    def same(k: str) -> bool:  # absent and a neutral default are the same config
        return (a[k] == b[k]) if (k in a and k in b) else _neutral(k, a.get(k, b.get(k)))

    return [f"{k}: {show(a, k)} -> {show(b, k)}" for k in sorted(set(a) | set(b)) if not same(k) and not _excluded(k)]
