"""The hub reachability probe: one short TCP connection before any hub call, so an unreachable hub fails in
seconds instead of ~23 s of retries per call; `hub_offline` switches hub libraries to offline mode for a call.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Iterator, Optional

PROBE_TIMEOUT_S = 2.5


_PROBE_TTL_S = 60.0


_TRUE = {"1", "ON", "YES", "TRUE"}


class HubUnavailable(RuntimeError):
    """The Hugging Face hub cannot be reached (or offline mode is on) and the local cache lacks what was asked."""


def offline_requested(datasets: bool = False) -> bool:
    """True when the environment asks for offline mode: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE (and, for
    datasets, HF_DATASETS_OFFLINE), read now, or huggingface_hub's own flag (read when it was imported)."""
    names = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if datasets else [])
    if any(os.environ.get(n, "").strip().upper() in _TRUE for n in names):
        return True
    hh = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(hh, "HF_HUB_OFFLINE", False))


def _endpoint() -> str:
    env = os.environ.get("HF_ENDPOINT")
    if env:
        return env.rstrip("/")
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except Exception:  # pragma: no cover - huggingface_hub is a dependency of transformers
        return "https://huggingface.co"


def _probe_target(endpoint: str) -> tuple[str, int, str]:
    """(host, port, what) that a connection to `endpoint` goes through first: the proxy if one applies."""
    u = urllib.parse.urlsplit(endpoint)
    host = u.hostname or "huggingface.co"
    port = u.port or (443 if u.scheme == "https" else 80)
    proxies = _getproxies()
    proxy = proxies.get(u.scheme) or proxies.get("all")
    if proxy and not _bypass_proxy(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if p.hostname:
            return p.hostname, p.port or (443 if p.scheme == "https" else 80), f"proxy {p.hostname}:{p.port or ''} for {endpoint}"
    return host, port, endpoint


def _getproxies() -> dict:
    import urllib.request

    return urllib.request.getproxies()


def _bypass_proxy(host: str) -> bool:
    import urllib.request

    try:
        return bool(urllib.request.proxy_bypass(host))
    except Exception:
        return False


def _connect(host: str, port: int, timeout: float) -> Optional[str]:
    """None if a TCP connection to host:port opens within `timeout` (DNS included), else the reason."""
    result: list[Optional[str]] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as e:  # DNS failure, refused, unreachable, timeout
            result.append(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)

    # getaddrinfo ignores socket timeouts; a daemon thread bounds the whole attempt.
    t = threading.Thread(target=attempt, name="ftlab-hub-probe", daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        return f"no answer within {timeout:g} s"
    return result[0]


def hub_status(datasets: bool = False, timeout: float = PROBE_TIMEOUT_S, use_cache: bool = True) -> tuple[bool, str]:
    """Whether to talk to the hub: (True, endpoint) or (False, why not).

    Offline when the offline variables ask for it (no probe then), or when one TCP connection to the hub
    endpoint (or its proxy) does not open within `timeout` seconds. Results are remembered for 60 s.
    """
    if offline_requested(datasets=datasets):
        names = "HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE" + ("/HF_DATASETS_OFFLINE" if datasets else "")
        return False, f"offline mode is on ({names})"
    endpoint = _endpoint()
    host, port, what = _probe_target(endpoint)
    now = time.monotonic()
    cached = _probe_cache.get((host, port)) if use_cache else None
    if cached is not None and now - cached[0] < _PROBE_TTL_S:
        reason = cached[1]
    else:
        reason = _connect(host, port, timeout)
        _probe_cache[(host, port)] = (now, reason)
    if reason is None:
        return True, endpoint
    return False, f"the Hugging Face hub ({what}) is unreachable ({reason})"


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Switch huggingface_hub (hence transformers) and datasets to offline mode for the duration.

    Their flags are read from the environment once, at import; this sets the module flags so that a
    cache miss fails at once instead of retrying for ~23 s.
    """
    from huggingface_hub import constants as hh

    ds = sys.modules.get("datasets.config")
    saved = (hh.HF_HUB_OFFLINE, getattr(ds, "HF_HUB_OFFLINE", None))
    hh.HF_HUB_OFFLINE = True
    if ds is not None:
        ds.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hh.HF_HUB_OFFLINE = saved[0]
        if ds is not None:
            ds.HF_HUB_OFFLINE = saved[1]


_probe_cache: dict[tuple[str, int], tuple[float, Optional[str]]] = {}


def load_hub_dataset(path: str, name: str | None = None, *, revision: str | None = None, split: str | None = None,
                     what: str, fix: str, detail: str = ""):
    """`datasets.load_dataset` that never hangs: a local dataset directory loads directly; otherwise the hub probe
    runs while `datasets` is imported (about a second on a cold start: together < 3 s), and an unreachable hub
    loads offline from the local cache or raises HubUnavailable saying `what` failed and `fix`."""
    if Path(path).expanduser().exists():  # a local dataset directory: no hub involved
        import datasets

        return datasets.load_dataset(str(Path(path).expanduser()), name, split=split, revision=revision)
    status: list[tuple[bool, str]] = []
    probe = threading.Thread(target=lambda: status.append(hub_status(datasets=True)), daemon=True)
    probe.start()
    import datasets

    probe.join()
    online, why = status[0] if status else hub_status(datasets=True)
    try:
        with contextlib.nullcontext() if online else hub_offline():
            return datasets.load_dataset(path, name, split=split, revision=revision)
    except Exception as e:
        not_found = isinstance(e, (OSError, datasets.exceptions.DatasetNotFoundError))
        if online or not not_found:
            raise
        conf = f", config {name!r}" if name else ""
        at = f", split {split!r}" if split else ""
        raise HubUnavailable(f"{what} ({detail}hub dataset {path!r}{conf}{at}): {why}, and the local datasets "
                             f"cache does not hold it. {fix}") from e
