"""Tuning methods. Each is one module (its config, its checks, its registration) + one YAML in conf/method/ + one
row in tests/test_methods.py.

A method plugs into the one training loop through the hooks of `Method` (see base.py); the registry `METHODS`
maps the YAML's `name` to the class and to its config schema.
"""

from __future__ import annotations

from ftlab.methods.base import METHODS, Method, MethodConfig, MethodContext, build_method

__all__ = ["METHODS", "Method", "MethodConfig", "MethodContext", "build_method"]
