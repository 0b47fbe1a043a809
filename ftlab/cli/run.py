"""The `ftlab` command. Hydra lives here only: compose, validate, make the run directory, hand off.

Every config (each job of a `-m` sweep too) is composed and validated before Hydra starts and before
torch is imported, so a refused config costs well under 2 s and leaves no run directory behind.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ftlab.config.conf import conf_dir

# Flags that ask Hydra for information; they need no validation and start no run.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve", "--package", "-p",
               "--shell-completion", "-sc"}


def _register_resolvers() -> None:
    from ftlab.config.validate import register_resolvers

    register_resolvers()  # the config's own interpolations (conf/model/hf.yaml), for `--cfg job --resolve` too
    if not OmegaConf.has_resolver("ftlab_run"):
        # The run directory's name from the job's own validated config (ftlab.rundir.identity): the same config
        # always lands in the same directory, so a repeated run or a resubmitted sweep finds its earlier work.
        OmegaConf.register_new_resolver("ftlab_run", _run_name_of)


def _run_name_of(*, _root_) -> str:
    from ftlab.config.schema import to_container
    from ftlab.config.validate import validate
    from ftlab.rundir.identity import run_name

    return run_name(to_container(validate(_root_)))


def _register_schemas() -> None:
    """Typed schemas under the YAML: every key exists with its default, and types are checked on merge."""
    from hydra.core.config_store import ConfigStore

    from ftlab.config.method import METHODS
    from ftlab.config.schema import RunConfig

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for name in METHODS.names():
        cs.store(group="schema/method", name=name, node=METHODS.config(name))


_DATA_LIST = re.compile(r"^data=\[([^\[\]]*)\]$")


def stage_args(args: list[str]) -> list[str]:
    """`data=[a,b,c]` (continual stages) -> `data=a stages=[a,b,c]`: Hydra would merge the options of a list into
    one `data` node; ftlab expands each stage at validation (ftlab.config.schema) instead."""
    out = []
    for a in args:
        m = _DATA_LIST.match(a)
        if m:
            names = [n.strip() for n in m.group(1).split(",") if n.strip()]
            out += [f"data={names[0]}" if names else "data", f"stages=[{','.join(names)}]"]
        else:
            out.append(a)
    return out


def model_args(args: list[str]) -> list[str]:
    """`model.name_or_path=X` without a `model=` choice -> `model=hf` first (conf/model/hf.yaml, the generic HF
    model group), so a real model never inherits model=tiny's settings (length 64, fp32, eager attention, the name
    "tiny"). `model.name_or_path=tiny` keeps model=tiny."""
    keys: dict[str, str] = {}
    for a in args:
        if not a.startswith("-") and "=" in a:
            k, v = a.split("=", 1)
            keys[k.lstrip("+~")] = v
    path = keys.get("model.name_or_path")
    if "model" in keys or path is None or all(v.strip().strip("'\"") == "tiny" for v in path.split(",")):
        return args
    return ["model=hf", *args]


def _split(args: list[str]) -> tuple[list[str], bool]:
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if not a.startswith("-")]
    return overrides, multirun


def _job_overrides(overrides: list[str], multirun: bool, sweeper_params: dict) -> list[list[str]]:
    """The overrides of every job, as Hydra's basic sweeper makes them: the sweep in the composed config's
    `hydra.sweeper.params` (an experiment overlay's), then the command line's (which wins for the same key)."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    if any(o.key_or_group.startswith("hydra/sweeper") for o in parsed):
        # Another sweeper decides the jobs itself; each job is still validated when it starts.
        return [[o.input_line for o in parsed if not o.is_sweep_override()]]
    params = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in sweeper_params.items()])
    return [job for batch in BasicSweeper.split_arguments(params + parsed, None) for job in batch]


def check(overrides: list[str], multirun: bool = False) -> list:
    """Compose and validate every job (those of a sweep written in an experiment's YAML too); return their typed
    configs. Raises ConfigError or Hydra's errors."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ftlab.config.validate import validate

    _register_resolvers()
    _register_schemas()
    out, out_dirs = [], []
    overrides = model_args(stage_args(overrides))
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3", job_name="ftlab"):
        params: dict = {}
        if multirun:
            fixed = [o.input_line for o in OverridesParser.create().parse_overrides(overrides)
                     if not o.is_sweep_override()]
            master = compose(config_name="config", overrides=fixed, return_hydra_config=True)
            swept = master.hydra.sweeper.get("params")
            params = OmegaConf.to_container(swept, resolve=False) if swept else {}
        for job in _job_overrides(overrides, multirun, params):
            cfg = compose(config_name="config", overrides=job)
            out.append(validate(cfg))
            out_dirs.append(str(cfg.out_dir))  # resolved now (validate keeps one result per config per process)
    from ftlab.cli.inputs import check_inputs, check_places

    for run, out_dir in zip(out, out_dirs):  # every input file read, every directory probed, before any exists
        check_inputs(run)
        check_places(out_dir)
    return out


def _hydra_message(msg: str, cause: str = "", overrides: list[str] = ()) -> str:
    """Hydra's composition errors, said in ftlab's words (full key, valid choices), without the search path."""
    msg = msg.split("Config search path")[0].strip()
    m = re.match(r"Error merging override (\S+?)=", msg)
    if m and cause:
        return f"{m.group(1)}: {cause.splitlines()[0]}"
    m = re.search(r"Could not find '([\w./-]+)/([^']+)'\s*Available options in '[^']+':\s*(.*)", msg, re.S)
    if m:
        group, name, options = m.group(1), m.group(2), ", ".join(m.group(3).split())
        return f"{group}={name}: unknown {group}; valid choices: {options}"
    m = re.search(r"Could not override '([^']+)'", msg)
    if m:
        key = m.group(1)
        valid = _valid_keys(key, overrides)
        hint = f"valid keys of {key.rpartition('.')[0] or 'the config'}: {valid}" if valid else "see `ftlab run --cfg job`"
        return f"{key}: unknown key; {hint}"
    m = re.search(r"Key '([^']+)' is not in struct\s+full_key: ([\w.]+)", msg)
    if m:
        return f"{m.group(2)}: unknown key; print the valid keys with `ftlab run --cfg job`"
    return msg


def _valid_keys(key: str, overrides: list[str]) -> str:
    """The keys that do exist beside an unknown one, from the config composed without the bad override."""
    from hydra import compose, initialize_config_dir

    rest = [o for o in overrides if not o.lstrip("+~").startswith(key + "=") and "," not in o]
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3", job_name="ftlab"):
            cfg = compose(config_name="config", overrides=rest)
        parent = key.rpartition(".")[0]
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return ", ".join(str(k) for k in node.keys()) if node is not None and hasattr(node, "keys") else ""
    except Exception:
        return ""


def _refuse(msg: str) -> int:
    print(f"ftlab: config refused: {msg}", file=sys.stderr)
    return 2


GROUPS = {
    "model": "architecture, weights, tokenizer, prompt format; any HF id or local dir via model.name_or_path=",
    "data": "training data (and the target task's held-out split); a local jsonl via data.path=",
    "method": "how parameters are tuned",
    "eval": "target task(s) and forgetting suite; eval.limit caps examples per task",
    "hw": "device, precision, processes; slurm_cpu / slurm_gpu submit to SLURM (hw.slurm.*)",
    "logger": "where metrics go besides the run directory",
    "reg": "a regulariser added to the training loss, with any method (reg.weight scales it)",
    "post": "variants after training (interp, LiNeS), evaluated and recorded beside the run (docs/post.md)",
    "experiment": "paper recipes (overlays): +experiment=NAME; with -m the sweep in its YAML runs",
    "debug": "tiny, fast overlays for plumbing checks: +debug=fast",
}


def run_help() -> str:
    """`ftlab run --help`: each group with its options and the first comment line of each option's YAML."""
    root = Path(conf_dir())
    lines = ["usage: ftlab run [-m] [group=option ...] [key=value ...]", "",
             "Fine-tune, evaluate base and tuned on the target and the forgetting suite, report gain and forgetting.",
             "", "Config groups (default marked *):"]
    defaults = OmegaConf.load(root / "config.yaml").defaults
    chosen = {k: v for d in defaults if isinstance(d, dict) or hasattr(d, "items") for k, v in d.items()}
    for group, what in GROUPS.items():
        lines.append(f"  {group:<10} {what}")
        for f in sorted((root / group).glob("*.yaml")):
            comments = [ln for ln in f.read_text().splitlines() if ln.startswith("#") and "@package" not in ln]
            note = comments[0].lstrip("# ").strip() if comments else ""
            mark = "*" if chosen.get(group) == f.stem else " "
            lines.append(f"           {mark} {f.stem:<19} {note}"[:150])
    lines += ["", "Common knobs: seed, train.max_steps, train.lr, train.batch_size, train.grad_accum,",
              "              train.save_every (0: checkpoint only at the end), eval.limit (examples per task)",
              "Every key: ftlab run --cfg job.   Hydra's own flags: ftlab run --hydra-help.", "",
              "Examples:",
              "  ftlab run                                    embedded default: tiny world, LoRA, CPU, offline",
              "  ftlab run method=full train.max_steps=300",
              "  ftlab run -m method=full,lora seed=0,1,2     a sweep: one run directory per job",
              "  ftlab run model=qwen2.5-0.5b data=gsm8k eval=target data.path=train.jsonl",
              "", "Results: <out_dir>/runs/<method>_<data>_s<seed>_<config digest>/result.json (out_dir: $FTLAB_OUTPUTS",
              "or ./outputs). The directory is named by the config: running a completed config again returns its",
              "record; a resubmitted sweep skips finished runs and resumes partial ones."]
    return "\n".join(lines)


def _cfg_job(args: list[str]) -> tuple[list[str], str | None] | None:
    """For `--cfg job` (`-c job`, `--cfg=job`): the other arguments and the `--package`/`-p` asked for, else None;
    the other --cfg views (hydra, all) stay Hydra's."""
    rest, package, job, i = [], None, False, 0
    while i < len(args):
        a, nxt = args[i], (args[i + 1] if i + 1 < len(args) else None)
        if a in ("--cfg", "-c") and nxt == "job" or a == "--cfg=job":
            job, i = True, i + (1 if "=" in a else 2)
        elif a in ("--package", "-p") and nxt is not None or a.startswith("--package="):
            package, i = (a.split("=", 1)[1], i + 1) if "=" in a else (nxt, i + 2)
        else:
            rest.append(a)
            i += 1
    return (rest, package) if job else None


def _package(container: dict, package: str | None):
    """One package of a config (`model`, `train`, `model.world`), as Hydra's --package selects it."""
    if package in (None, "", "_global_"):
        return container
    node = container
    for key in package.split("."):
        if not isinstance(node, dict) or key not in node:
            from ftlab.config.registry import ConfigError

            raise ConfigError(f"--package {package}: no such key in the config")
        node = node[key]
    return {package.rsplit(".", 1)[-1]: node}


def run_command(args: list[str]) -> int:
    if any(a in ("--help", "-h") for a in args):
        print(run_help())
        return 0
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ftlab.config.registry import ConfigError

    args = model_args(stage_args(args))
    job = _cfg_job(args)
    if job is not None:  # ftlab's own view: the validated config, every null resolved (train.lr, model settings)
        import yaml

        from ftlab.config.schema import to_container

        overrides, multirun = _split(job[0])
        try:
            views = [_package(to_container(r), job[1]) for r in check(overrides, multirun)]
        except ConfigError as e:
            return _refuse(str(e))
        except (HydraException, OmegaConfBaseException) as e:
            return _refuse(_hydra_message(str(e), str(e.__cause__ or ""), overrides))
        print("\n---\n".join(yaml.safe_dump(v, sort_keys=False).rstrip() for v in views))
        return 0
    if not any(a in _INFO_FLAGS or a.split("=")[0] in _INFO_FLAGS for a in args):
        overrides, multirun = _split(args)
        try:
            args = _slurm_args(args, check(overrides, multirun), multirun)
        except ConfigError as e:
            return _refuse(str(e))
        except (HydraException, OmegaConfBaseException) as e:
            return _refuse(_hydra_message(str(e), str(e.__cause__ or ""), overrides))
    _register_resolvers()
    _register_schemas()
    sys.argv = ["ftlab run", *args]
    try:
        _hydra_entry()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0


def _slurm_args(args: list[str], jobs: list, multirun: bool) -> list[str]:
    """hw=slurm_*: every job goes to SLURM through ftlab's submitit launcher (hydra_plugins.ftlab_slurm_launcher),
    which submits and returns at once; a single run is submitted as a one-job sweep."""
    from ftlab.config.registry import ConfigError

    slurm = [j.hw.slurm for j in jobs]
    if all(s is None for s in slurm):
        return args
    if any(s != slurm[0] for s in slurm):
        raise ConfigError("hw.slurm: the jobs of a sweep are one SLURM array and share hw.slurm (and the hw "
                          "profile's kind); submit different hw.slurm settings, or SLURM and local runs, separately")
    from hydra_plugins.ftlab_slurm_launcher import LAUNCHER, register_launcher

    register_launcher()
    extra = [] if any(a.startswith("hydra/launcher=") for a in args) else [f"hydra/launcher={LAUNCHER}"]
    return [*(args if multirun else ["-m", *args]), *extra]


def _task(cfg) -> float | None:
    """One job, inside Hydra: write the resolved config into the run directory and run from there."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ftlab.config.registry import ConfigError
    from ftlab.config.validate import validate

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        run = validate(cfg)
    except ConfigError as e:  # only reachable for jobs a non-basic sweeper made up
        print(f"ftlab: config refused: {e}", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:
            return None
        raise SystemExit(2)

    from ftlab.config.post import missing_variants
    from ftlab.launch.start import execute, refusal
    from ftlab.rundir.identity import ResumeRefused
    from ftlab.rundir.layout import completed_record, prepare_run_dir

    problem = refusal(run.hw)
    if problem:  # before the run directory exists, and before torchrun starts N processes that would all fail
        print(f"ftlab: run refused: {problem}", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:
            return None
        raise SystemExit(2)
    from ftlab.rundir.layout import RunDirBusy

    try:
        prepare_run_dir(run_dir, run)
        done = completed_record(run_dir)
    except (ResumeRefused, RunDirBusy) as e:
        print(f"ftlab: run refused: {e}", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:
            return None
        raise SystemExit(2)
    except OSError as e:
        print(f"ftlab: run refused: cannot write the run directory {run_dir} ({e.strerror or e}); set FTLAB_OUTPUTS "
              "to a writable directory", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:
            return None
        raise SystemExit(2)
    if done is not None and not missing_variants(run.post, done, str(run_dir)):
        print(f"ftlab: {run_dir.name} already completed with this config (gain {done['summary'].get('gain')}); "
              f"record: {run_dir / 'result.json'}. Delete that directory to run it again.", file=sys.stderr)
        return done["summary"].get("gain")
    try:
        failure = execute(run_dir, run.hw)
    except RunDirBusy as e:  # a concurrent run of the same config holds the directory
        print(f"ftlab: run refused: {e}; wait for it to finish (or stop it) and run again", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:
            return None
        raise SystemExit(2)
    if failure is not None:
        print(f"ftlab: run failed: {failure}\n  record: {run_dir / 'result.json'}", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:  # one failed job does not stop the sweep
            return None
        raise SystemExit(1)
    return completed_record(run_dir)["summary"].get("gain")


def _hydra_entry() -> None:
    import hydra

    hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")(_task)()

