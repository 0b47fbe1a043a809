"""Tuning methods. Each is one module + one YAML in conf/method/ + one row in tests/test_methods.py.

A method plugs into the one training loop through the hooks of `Method` (see base.py); the registry maps
the YAML's `name` to the class.
"""

from __future__ import annotations

from ftlab.methods.base import Method, MethodContext, build_method, register

__all__ = ["Method", "MethodContext", "build_method", "register"]
