"""The one exception type the CLI turns into a single clear line on stderr."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, output or model that the CLI reports in one line.

    Raised for everything issue 3 lists as bad input (missing or unreadable scene, unsupported
    dtype, rotated transform, all-nodata scene, empty expression, existing or unwritable output,
    missing or incomplete model). The message is complete on its own: no traceback is printed
    unless the user asked for ``-v``.
    """
