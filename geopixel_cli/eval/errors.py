"""The evaluator's user-facing error type."""

from __future__ import annotations


class EvalError(Exception):
    """Bad or inconsistent evaluation input; the message names the offending record."""
