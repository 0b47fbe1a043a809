"""Files written so that a kill at any moment leaves the old content or the new, never half of it; and content
digests. Every writer of the run directory, the checkpoints and the caches uses these."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

COMPLETE = "COMPLETE"  # the marker atomic_dir writes last: a directory without it is never used

_digest_cache: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's content; cached per (real path, size, mtime) in this process. A hub-cache
    snapshot links to blobs named by their sha256 (LFS files): that name is reused instead of re-reading GBs."""
    path = Path(path)
    real = path.resolve()
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key in _digest_cache:
        return _digest_cache[key]
    if path.is_symlink() and real.parent.name == "blobs" and len(real.name) == 64:
        try:
            int(real.name, 16)
            _digest_cache[key] = real.name
            return real.name
        except ValueError:
            pass
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    _digest_cache[key] = h.hexdigest()
    return _digest_cache[key]


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort: some file systems refuse fsync on directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory, fsync, rename: a reader sees the old or the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield `<path>.tmp` to fill; then fsync every file, write COMPLETE last and rename it to `path`. A kill at
    any point leaves either the old `path` or the new one whole, never a directory with COMPLETE and missing
    files. Used by training-state checkpoints, stage snapshots and the final export."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_file(f)
    (tmp / COMPLETE).write_text("ok\n")  # written last: a directory without it is never used
    fsync_file(tmp / COMPLETE)
    fsync_dir(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    fsync_dir(path.parent)


def cache_root(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Where ftlab caches base models and base evaluations: `cache_dir`, else $FTLAB_CACHE, else
    $XDG_CACHE_HOME/ftlab, else ~/.cache/ftlab."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("FTLAB_CACHE"):
        return Path(os.environ["FTLAB_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "ftlab"
    return Path.home() / ".cache" / "ftlab"
