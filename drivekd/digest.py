"""Files identified by their whole content: SHA-256, read in 1 MiB chunks (never whole into memory)."""

from __future__ import annotations

import hashlib
import os
from typing import Any


def update_with_file(h: Any, path: str | os.PathLike[str]) -> Any:
    """Feed a file's bytes to the hash `h`; returns it."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def sha256_of(path: str | os.PathLike[str]) -> str:
    """A file's SHA-256, hex."""
    return update_with_file(hashlib.sha256(), path).hexdigest()
