"""Errors every abdag command reports as one line (``abdag NAME: message``, exit 2)."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""
