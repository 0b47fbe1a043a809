"""Every shipped config composes and validates: each option of each group (conf/<group>/*.yaml, the defaults
otherwise) and each `# @package _global_` overlay (conf/experiment/, conf/debug/), alone, swept as its
hydra.sweeper.params say, and stacked under every debug overlay. Files are enumerated from conf/, so a new YAML is
covered without touching this test. Composition and validation only: no run, no torch."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

# The one import from ftlab (composes and validates every job, returns typed configs); follow it if it moves.
from ftlab.cli.run import check

CONF = Path(__file__).resolve().parents[1] / "conf"
GLOBAL = "# @package _global_"
OVERLAY_DIRS = ("experiment", "debug")  # every file in these must be a _global_ overlay


def _is_overlay(path: Path) -> bool:
    return path.read_text().splitlines()[:1] == [GLOBAL]


def _default_groups() -> set[str]:
    """Groups named in config.yaml's defaults list: chosen with `group=x`; any other group needs `+group=x`."""
    out = set()
    for entry in OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml")).get("defaults", []):
        if isinstance(entry, dict):
            for key in entry:
                out.add(key.replace("optional ", "").replace("override ", "").strip().lstrip("/"))
    return out


DEFAULT_GROUPS = _default_groups()
FILES = sorted(p for p in CONF.glob("*/*.yaml"))
OPTIONS = [p for p in FILES if not _is_overlay(p)]
OVERLAYS = [p for p in FILES if _is_overlay(p)]
DEBUG = [p for p in OVERLAYS if p.parent.name == "debug"]
EXPERIMENTS = [p for p in OVERLAYS if p.parent.name != "debug"]


def _choose(path: Path) -> str:
    group = path.parent.name
    return f"{'' if group in DEFAULT_GROUPS else '+'}{group}={path.stem}"


def _id(path: Path) -> str:
    return f"{path.parent.name}={path.stem}"


def _own(path: Path) -> dict:
    """A YAML's own keys (without its defaults list and hydra settings), unresolved."""
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return {k: v for k, v in cfg.items() if k not in ("defaults", "hydra")}


def _get(node, key: str):
    return node[key] if isinstance(node, dict) else getattr(node, key)


def _assert_applied(node, expected: dict, where: str) -> None:
    """Every literal value of `expected` (interpolations aside) is what the typed config holds."""
    for key, want in expected.items():
        got = _get(node, key)
        if isinstance(want, str) and "${" in want:
            continue
        if isinstance(want, dict):
            _assert_applied(got, want, f"{where}.{key}")
        else:
            assert got == want, f"{where}.{key}: the YAML says {want!r}, the validated config has {got!r}"


def _context(path: Path) -> list[str]:
    """What an option needs beside it to be valid: a real (hub) model cannot train on the tiny world's synthetic
    data, so it is composed with real data and the target-only eval. Validation does not reach the hub."""
    if path.parent.name == "model" and _own(path).get("name_or_path") != "tiny":
        # the generic group (model=hf) names no model itself: any hub id
        return ["data=gsm8k", "eval=target", *([] if _own(path).get("name_or_path") else ["model.name_or_path=org/any"])]
    return []


def _choice_of(section) -> str:
    """The option a group section came from: its `name` (or `kind`, for reg)."""
    return getattr(section, "name", None) or section.kind


# ------------------------------------------------------------------------------------------ the conf/ tree itself
def test_the_conf_tree_is_enumerated():
    groups = {p.parent.name for p in OPTIONS}
    assert {"model", "data", "method", "eval", "hw", "logger", "reg"} <= groups
    assert {p.stem for p in EXPERIMENTS} >= {"lora_vs_full", "continual_two_stage"}
    assert "fast" in {p.stem for p in DEBUG}
    for d in OVERLAY_DIRS:
        for p in (CONF / d).glob("*.yaml"):
            assert _is_overlay(p), f"{p}: an overlay's first line must be {GLOBAL!r}"


@pytest.mark.parametrize("path", OVERLAYS, ids=_id)
def test_overlay_header_documents_how_to_run_it(path):
    header = []
    for line in path.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert len(header) >= 2, f"{path}: say what it is and how to run it in the comment at the top"
    want = f"ftlab run ... {_choose(path)}"
    assert "ftlab run" in text and _choose(path) in text, f"{path}: the header should show `{want}`"


# ------------------------------------------------------------------------------------------ every option of a group
@pytest.mark.parametrize("path", OPTIONS, ids=_id)
def test_every_option_composes_and_validates(path):
    group = path.parent.name
    context = _context(path)
    (run,) = check([f"{group}={path.stem}", *context])
    given = {o.split("=")[0].split(".", 1)[1] for o in context if o.startswith(f"{group}.")}  # set by the context
    _assert_applied(_get(run, group), {k: v for k, v in _own(path).items() if k not in given}, group)


# ------------------------------------------------------------------------------------------ every overlay
def _expected_sections(path: Path) -> dict:
    """What an overlay should leave in the config: for each `override /group: option` of its defaults list that
    option's own values, then the overlay's own keys on top."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    expected: dict = {}
    for entry in raw.get("defaults", []):
        if isinstance(entry, dict):
            for key, option in entry.items():
                group = key.replace("override", "").replace("optional", "").strip().lstrip("/")
                if option is not None and (CONF / group / f"{option}.yaml").is_file():
                    expected[group] = _own(CONF / group / f"{option}.yaml")
    return _merge(expected, _own(path))


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _assert_overlay(run, expected: dict, where: str) -> None:
    """`expected` (from _expected_sections) holds in the typed config; `stages` are option names in the YAML and
    full data configs once validated, with `data` as stage 0."""
    expected = dict(expected)
    stages = expected.pop("stages", None)
    _assert_applied(run, expected, where)
    if stages is not None:
        assert [s.name for s in run.stages] == stages, f"{where}: stages"
        assert run.data == run.stages[0], f"{where}: data is not stage 0"


@pytest.mark.parametrize("path", OVERLAYS, ids=_id)
def test_every_overlay_composes_validates_and_takes_effect(path):
    (run,) = check([_choose(path)])
    _assert_overlay(run, _expected_sections(path), path.stem)


def _sweep(path: Path) -> dict[str, list[str]]:
    params = OmegaConf.to_container(OmegaConf.load(path)).get("hydra", {}).get("sweeper", {}).get("params") or {}
    return {k: [v.strip() for v in str(s).split(",")] for k, s in params.items()}


def _value(run, key: str):
    node = run
    for part in key.split("."):
        node = _get(node, part)
    return _choice_of(node) if dataclasses.is_dataclass(node) else node


@pytest.mark.parametrize("path", [p for p in OVERLAYS if _sweep(p)], ids=_id)
def test_every_job_of_an_overlay_sweep_validates(path):
    """hydra.sweeper.params are expanded by Hydra's sweeper when the run starts; here every job is composed and
    validated up front, as ftlab does for a sweep given on the command line (params first, as Hydra orders them)."""
    sweep = _sweep(path)
    runs = check([_choose(path), *(f"{k}={','.join(v)}" for k, v in sweep.items())], True)
    want = sorted(itertools.product(*([yaml.safe_load(x) for x in v] for v in sweep.values())))
    got = sorted(tuple(_value(r, k) for k in sweep) for r in runs)
    assert got == want
    swept: dict = {}  # a swept key is not the overlay's to fix; the rest of the overlay holds in every job
    for key in sweep:
        *parents, leaf = key.split(".")
        node = swept
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = None
    fixed = _without(_expected_sections(path), swept)
    for r in runs:
        _assert_overlay(r, fixed, path.stem)


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=_id)
@pytest.mark.parametrize("debug", DEBUG, ids=_id)
def test_every_experiment_shrinks_under_every_debug_overlay(experiment, debug):
    """`ftlab run +experiment=X +debug=Y`: the later overlay wins where both set a key; the rest of X holds."""
    (run,) = check([_choose(experiment), _choose(debug)])
    dbg = _expected_sections(debug)
    _assert_overlay(run, dbg, f"{experiment.stem}+{debug.stem}")
    _assert_overlay(run, _without(_expected_sections(experiment), dbg), experiment.stem)


def _without(expected: dict, override: dict) -> dict:
    """`expected` less every leaf that `override` sets."""
    out = {}
    for key, value in expected.items():
        if key not in override:
            out[key] = value
        elif isinstance(value, dict) and isinstance(override[key], dict):
            out[key] = _without(value, override[key])
    return out
