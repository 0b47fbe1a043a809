"""One registry mechanism for every name a config can pick: methods, regularisers, task kinds, built-in tasks and
data formats.

A registry maps a name to an entry (a class, a function, a spec) and, optionally, to its config schema. Entries are
registered beside their code (`@METHODS.register("lora", config=LoraConfig)`); a registry that must be complete
before validation names the package whose modules register into it (`discover=`), and imports every public
module of that package (not those starting with `_`; or the one module, when it names a module) the first time
a name is asked for. Such packages keep
their modules free of heavy imports at module level (torch, peft are imported where they are used), so
validating a config stays fast and torch-free.

Unknown names fail with the full config key, the valid names and the closest one ("did you mean").
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config was refused. The message names the full key and what would fix it."""


class Registry(Generic[T]):
    def __init__(self, kind: str, key: str, *, discover: Optional[str] = None):
        self.kind = kind  # what the entries are, for messages: "method"
        self.key = key  # the config key that picks one: "method.name"
        self._discover = discover
        self._discovered = discover is None
        self._entries: dict[str, T] = {}
        self._configs: dict[str, type] = {}

    def register(self, name: str, entry: Any = None, *, config: Optional[type] = None) -> Callable[[T], T] | T:
        """`REG.register(name, entry)`, or as a decorator `@REG.register(name, config=Schema)`."""

        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({self._entries[name]!r} and {obj!r})")
            self._entries[name] = obj
            if config is not None:
                self._configs[name] = config
            return obj

        return add if entry is None else add(entry)

    def _load(self) -> None:
        if self._discovered:
            return
        self._discovered = True  # before importing: a module that asks for names while registering sees no loop
        pkg = importlib.import_module(self._discover)
        if not hasattr(pkg, "__path__"):  # a module, not a package: it registers everything itself
            return
        for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if not m.name.startswith("_"):
                importlib.import_module(f"{self._discover}.{m.name}")

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def check(self, name: Any, key: Optional[str] = None) -> str:
        """`name` if registered; else ConfigError naming the key, the valid names and the closest one."""
        self._load()
        if name in self._entries:
            return name
        raise ConfigError(unknown(key or self.key, name, self._entries))

    def get(self, name: Any, key: Optional[str] = None) -> T:
        return self._entries[self.check(name, key)]

    def config(self, name: Any, key: Optional[str] = None) -> type:
        """The config schema registered with `name`."""
        self.check(name, key)
        return self._configs[name]

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return list(self._entries.items())


def unknown(key: str, value: Any, valid) -> str:
    """The message for a value that is not one of `valid`: the key, the value, the choices, the closest one."""
    valid = [str(v) for v in valid]
    close = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{key}: unknown value {value!r}; valid choices: {', '.join(valid)}{hint}"
