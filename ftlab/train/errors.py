"""Errors the training loop raises on purpose.
"""

from __future__ import annotations


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the run stops before the optimizer step, and nothing is saved."""
