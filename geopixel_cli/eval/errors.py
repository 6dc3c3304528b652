"""The evaluator's user-facing error type."""

from __future__ import annotations

from geopixel_cli.errors import UserError


class EvalError(UserError):
    """Bad or inconsistent evaluation input; the message names the offending record.

    A :class:`~geopixel_cli.errors.UserError`, so the CLI prints it as one line on stderr and
    exits with status 1.
    """
