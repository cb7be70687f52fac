"""User-facing errors: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DriveKDError(Exception):
    """An error caused by the user's input (file, config, arguments), not by a bug.

    The message is kept to one line: a line break inside quoted data (a scene id, a question) is
    shown as `\\n`, so the error stays one line on stderr.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def closest(name: object, options: Iterable[str]) -> str | None:
    """The valid name a mistyped one most likely meant (for "did you mean ...?"), or None."""
    found = difflib.get_close_matches(str(name), list(options), n=1)
    return found[0] if found else None


class DataError(DriveKDError):
    """Malformed or inconsistent data: the message names the file, the item and what is wrong."""
