"""Finding run directories, reading them, and grouping them: what `ftlab report` compares.

A run directory is any directory holding config.yaml (a run's frozen config: it has `method` and `seed`) or
result.json, however it is nested (a local sweep's out_dir/runs/, a SLURM layout, a parent of several sweeps).
Torch-free: config.yaml and the JSON files are read as plain data."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ftlab.config.files import CONFIG
from ftlab.rundir.identity import config_digest, flatten, identity_payload
from ftlab.rundir.record import RECORDS, RESULT

STATUSES = ("completed", "running", "failed", "preempted", "pending")
CURVE_FILE = "curve.jsonl"
TRAIN_CURVE = "metrics.jsonl"


class ReportError(ValueError):
    """Input the report cannot use; the message is one line naming the file or key and the fix."""


@dataclass
class Run:
    path: Path
    config: dict
    result: dict
    digest: str
    flat: dict = field(default_factory=dict)  # the identity part of the config, flattened to dotted keys

    @property
    def status(self) -> str:
        return self.result.get("status") or "pending" if self.result else "pending"

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    def summary(self, split: str = "test") -> dict:
        return (self.result.get("validation") or {}).get("summary") or {} if split == "validation" \
            else self.result.get("summary") or {}

    def tasks(self, split: str = "test") -> dict:
        return (self.result.get("validation") or {}).get("tasks") or {} if split == "validation" \
            else self.result.get("tasks") or {}

    def records(self, which: str, task: str) -> Optional[list[dict]]:
        """records/<which>/<task>.jsonl as rows (None when absent)."""
        return _jsonl(self.path / RECORDS / which / f"{task}.jsonl")

    def curve(self) -> Optional[list[dict]]:
        return _jsonl(self.path / CURVE_FILE)

    def train_curve(self) -> Optional[list[dict]]:
        return _jsonl(self.path / TRAIN_CURVE)


def _jsonl(p: Path) -> Optional[list[dict]]:
    if not p.is_file():
        return None
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise ReportError(f"{p}:{i}: not JSON ({e}); rewrite or remove the file") from None
    return rows


def find_run_dirs(paths: list[str]) -> list[Path]:
    """Every run directory under the paths (a path may itself be one), each once (by its resolved path);
    hidden directories (.hydra, .submitit) and a run directory's own subfolders are not searched."""
    found: dict[Path, None] = {}
    for p in paths:
        root = Path(p).expanduser()
        if not root.exists():
            raise ReportError(f"{p}: no such file or directory; give run directories, sweep directories or a parent")
        if root.is_file():
            root = root.parent
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            if _is_run_dir(Path(dirpath), filenames):
                found.setdefault(Path(dirpath).resolve(), None)
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return list(found)


def _is_run_dir(d: Path, filenames: list[str]) -> bool:
    if RESULT in filenames:
        return True
    if CONFIG not in filenames:
        return False
    import yaml

    try:
        cfg = yaml.safe_load((d / CONFIG).read_text())
    except (OSError, yaml.YAMLError):  # not a run's config (Hydra's multirun.yaml, an unrelated file)
        return False
    return isinstance(cfg, dict) and "method" in cfg and "seed" in cfg


def load_run(d: Path) -> Run:
    import yaml

    cfg_path, res_path = d / CONFIG, d / RESULT
    try:
        config = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
    except yaml.YAMLError as e:
        raise ReportError(f"{cfg_path}: not YAML ({str(e).splitlines()[0]}); fix or remove the run directory") from None
    try:
        result = json.loads(res_path.read_text()) if res_path.is_file() else {}
    except ValueError as e:
        raise ReportError(f"{res_path}: not JSON ({e}); the run was interrupted mid-write? rerun it") from None
    if not config and result.get("status") == "completed":
        raise ReportError(f"{d}: result.json without config.yaml; the report groups runs by their config")
    payload = identity_payload(config) if config else {}
    digest = config_digest(config) if config else result.get("config_sha256") or str(d)
    return Run(path=d, config=config, result=result, digest=digest, flat=flatten(payload))


@dataclass
class Discovery:
    runs: list[Run]              # one per config digest (duplicates folded), every status
    counts: dict[str, int]       # status -> number of distinct runs
    duplicates: list[tuple[Path, Path]]  # (kept, dropped)

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if r.status == "completed"]


def discover(paths: list[str]) -> Discovery:
    """Find and read every run under the paths. Copies of one run (same config digest: a copied or re-synced
    sweep) count once: the completed copy is kept, the latest finished one among several."""
    by_digest: dict[str, list[Run]] = {}
    for d in find_run_dirs(paths):
        run = load_run(d)
        by_digest.setdefault(run.digest, []).append(run)
    runs, dups = [], []
    for copies in by_digest.values():
        copies.sort(key=lambda r: (r.status == "completed", r.result.get("finished_at") or "", str(r.path)),
                    reverse=True)
        runs.append(copies[0])
        dups += [(copies[0].path, c.path) for c in copies[1:]]
    counts = {s: 0 for s in STATUSES}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    return Discovery(runs=sorted(runs, key=lambda r: str(r.path)), counts=counts, duplicates=dups)


def _dropped(key: str, drop: tuple[str, ...]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in drop)


def group_key(run: Run, drop: tuple[str, ...] = ()) -> tuple:
    """The run's config minus seed and minus `drop` (the --over and --select keys): runs that differ only there
    are one group. out_dir, logger and hw.slurm are already outside the identity (ftlab.rundir.identity). A null
    key is the same as an absent one: a key added to the config later, null by default, does not split runs
    written before it from runs written after."""
    return tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in run.flat.items()
                        if k != "seed" and v is not None and not _dropped(k, drop)))


def check_key(runs: list[Run], key: str, flag: str) -> None:
    """A --over/--select key must name a config key (or a section) of the runs."""
    if not any(k == key or k.startswith(key + ".") for r in runs for k in r.flat):
        close = sorted({k for r in runs for k in r.flat if key.split(".")[-1] in k})[:5]
        raise ReportError(f"{flag} {key}: no run's config.yaml has this key"
                          + (f"; did you mean {', '.join(close)}?" if close else "; use a dotted key such as train.lr"))


def group_runs(runs: list[Run], drop: tuple[str, ...] = ()) -> list[list[Run]]:
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(group_key(r, drop), []).append(r)
    return [sorted(g, key=lambda r: (str(r.seed), str(r.path))) for g in groups.values()]


def _short(key: str) -> str:
    return key[:-5] if key.endswith(".name") else key


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "+".join(map(str, v))
    return str(v)


# label keys are tried in this order of sections (then by how many values they take): what was swept first
LABEL_ORDER = ("method.", "train.", "data.", "stages.", "reg.", "model.", "eval.", "hw.")


def label_groups(groups: list[list[Run]], drop: tuple[str, ...] = ()) -> list[str]:
    """A label per group from keys whose values differ between groups: the fewest keys, taken in LABEL_ORDER, that
    tell every group apart (the fairness section lists every difference, so the labels stay readable). A key
    under a section whose `name` differs (method.r when the methods differ) is a candidate only when it also
    differs between groups of the same name, so `method=full` and `method=lora` are not labelled with LoRA
    knobs. A null key counts as absent (group_key)."""
    reps = [g[0].flat for g in groups]
    keys = sorted({k for f in reps for k in f if k != "seed" and not _dropped(k, drop)})

    def val(f: dict, k: str) -> str:
        return json.dumps(f.get(k), sort_keys=True, default=str)

    differ = [k for k in keys if len({val(f, k) for f in reps}) > 1]
    candidates = []
    for k in differ:
        section = k.rpartition(".")[0]
        name_key = f"{section}.name" if section else None
        if name_key and k != name_key and name_key in differ:
            by_name: dict[str, set] = {}
            for f in reps:
                by_name.setdefault(val(f, name_key), set()).add(val(f, k))
            if all(len(v) == 1 for v in by_name.values()):
                continue
        candidates.append(k)

    def order(k: str) -> tuple:
        rank = next((i for i, p in enumerate(LABEL_ORDER) if k.startswith(p)), len(LABEL_ORDER))
        return (k != "method.name", rank, -len({val(f, k) for f in reps}), k)

    chosen: list[str] = []
    distinct = 1
    for k in sorted(candidates, key=order):
        n = len({tuple(val(f, c) for c in chosen + [k]) for f in reps})
        if n > distinct:
            chosen.append(k)
            distinct = n
        if distinct == len(groups):
            break
    if not chosen:
        labels = [_show(g[0].flat.get("method.name", "all")) for g in groups]
    else:
        labels = [" ".join(f"{_short(k)}={_show(g[0].flat.get(k, '-'))}" for k in chosen) for g in groups]
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):  # a label names one group in every table and plot
        seen[lab] = seen.get(lab, 0) + 1
        labels[i] = lab if seen[lab] == 1 else f"{lab} #{seen[lab]}"
    return labels


def finite(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None
