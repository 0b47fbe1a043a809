"""The two checks every schema uses: a value among its choices (with the closest one named), a number at least its
bound. Each refusal names the full key and the value given."""

from __future__ import annotations

from typing import Any

from ftlab.config.registry import ConfigError, unknown


def choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(unknown(key, value, choices))


def at_least(key: str, value: Any, low: float, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < low:
        raise ConfigError(f"{key}: must be >= {low}, got {value!r}")
