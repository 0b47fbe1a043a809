"""Every input file of a validated config, read and schema-checked before anything heavy (issue 11).

`ftlab run` calls `check_inputs` on every job after validation, before the run directory exists and before torch
or a model is loaded: each file (data.path, data.eval_path, data.mix_source when it is a file, the same for every
continual stage, eval.paths.*, eval.tasks.*.fewshot_path) is opened, decoded (UTF-8; a BOM is accepted) and every
record is checked with the readers the run itself uses (ftlab.data.sources read_jsonl and formatting,
ftlab.eval.builtin item checks), so a bad file is refused in well under 2 s with the key, FILE:LINE and field.
Torch-free: those readers import no torch at module level.
"""

from __future__ import annotations

import os

from ftlab.config.registry import ConfigError
from ftlab.utils.files import cache_root

# errors a reader raises for a bad file; each message already names the key, the file and the line
_BAD = (OSError, ValueError, KeyError, TypeError)


def _msg(e: BaseException, key: str, path: str) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, OSError) and not text.startswith(key):
        reason = e.strerror or type(e).__name__
        return f"{key}: cannot read {path!r} ({reason}); give a readable .jsonl file"
    return text if key in text or text.startswith(("data.", "eval.")) else f"{key}: {path}: {text}"


def _data_file(d, prefix: str) -> None:
    from ftlab.data.sources import format_row, read_jsonl

    for k, for_eval in (("path", False), ("eval_path", True)):
        p = getattr(d, k, None)
        if not p:
            continue
        key = f"{prefix}.{k}"
        try:
            for raw in read_jsonl(p, key):
                format_row(d, raw, for_eval=for_eval)
        except _BAD as e:
            raise ConfigError(_msg(e, key, p)) from None
    src = getattr(d, "mix_source", None)
    if src and (d.mix or 0) > 0 and os.path.isfile(os.path.expanduser(src)):
        key = f"{prefix}.mix_source"
        try:
            for raw in read_jsonl(src, key):
                v = raw.record.get(d.mix_field)
                if not isinstance(v, str):
                    what = "is missing" if d.mix_field not in raw.record else f"is a {type(v).__name__}, not text"
                    raise ValueError(f"{key}: {raw.where}: field {d.mix_field!r} {what}; fields there: "
                                     f"{', '.join(map(repr, raw.record)) or '(none)'}. Set data.mix_field=<one of them>")
        except _BAD as e:
            raise ConfigError(_msg(e, key, src)) from None


def _builtin_file(task: str, p: str, key: str) -> None:
    from ftlab.data.sources import read_jsonl
    from ftlab.eval.builtin import BUILTINS, checked_row

    spec = BUILTINS.get(task, "eval: built-in task")
    try:
        rows = [checked_row(spec, raw.record, raw.where, key) for raw in read_jsonl(p, key)]
    except _BAD as e:
        raise ConfigError(_msg(e, key, p)) from None
    if not any(r is not None for r in rows):
        raise ConfigError(f"{key}: {p} holds no {task} items; give a .jsonl with the hub dataset's fields")


def _fewshot_file(run, task: str, path: str) -> None:
    """A task evaluated from a local file at k > 0 names its few-shot file (load_builtin's rule, refused here
    before the model loads)."""
    from ftlab.eval.builtin import BUILTINS, fewshot_file_problem

    opts = (run.eval.tasks or {}).get(task)
    k = getattr(opts, "few_shot", None)
    problem = fewshot_file_problem(task, BUILTINS.get(task).few_shot if k is None else k, path,
                                   getattr(opts, "fewshot_path", None))
    if problem:
        raise ConfigError(problem)


def check_inputs(run) -> None:
    """Raise ConfigError naming the key, FILE:LINE and the field of the first bad input file of `run`."""
    _data_file(run.data, "data")
    for i, stage in enumerate(run.stages or []):
        if i > 0 and not isinstance(stage, str):
            _data_file(stage, f"stages.{i}")
    evaluated = set(run.eval.target) | set(run.eval.forget)
    for task, p in sorted((run.eval.paths or {}).items()):
        if p:
            _builtin_file(task, p, f"eval.paths.{task}")
            if task in evaluated:
                _fewshot_file(run, task, p)
    for task, opts in sorted((run.eval.tasks or {}).items()):
        fp = getattr(opts, "fewshot_path", None)
        if fp:
            _builtin_file(task, fp, f"eval.tasks.{task}.fewshot_path")



def _writable_dir(path: str, what: str, fix: str) -> None:
    """`path` is, or can be made, a writable directory: no part of it is a file, and its nearest existing
    directory takes a new file (a probe file, removed at once; also catches read-only file systems and root)."""
    import tempfile

    p = os.path.abspath(os.path.expanduser(path))
    probe = p
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"{what}: {probe!r} is a file, not a directory, so {p!r} cannot be made; {fix}")
    try:
        fd, name = tempfile.mkstemp(prefix=".ftlab_probe_", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ConfigError(f"{what}: cannot write in {probe!r} ({e.strerror or type(e).__name__}); {fix}") from None


def check_places(out_dir: str) -> None:
    """The outputs (`out_dir`, as resolved for this job) and cache directories can be made and written, before
    Hydra makes the run directory."""
    _writable_dir(os.path.join(out_dir, "runs"), "out_dir (FTLAB_OUTPUTS)",
                  "set FTLAB_OUTPUTS (or out_dir=) to a writable directory")
    _writable_dir(str(cache_root()), "cache (FTLAB_CACHE)", "set FTLAB_CACHE to a writable directory")
