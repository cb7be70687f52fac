"""Where a sample's image lives on this machine.

Rule, applied to each image path a data file holds:
1. `--image-root PREFIX=DIR` (repeatable): a path that starts with PREFIX has PREFIX replaced by
   DIR. The reference data writes elided prefixes such as `.../100k/train/x.jpg`; map them with
   `--image-root .../100k/train=/data/bdd100k/images/100k/train`.
2. Otherwise a leading elided component (`...` or `…`) is dropped, leaving a relative path.
3. A relative path resolves against the first plain `--image-root DIR` under which it exists (the
   first plain root if it exists under none), or, with no plain root, against the data file's folder.
4. An absolute path is used as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from drivekd.errors import DataError

_ELIDED = ("...", "…")


class ImageResolver:
    def __init__(self, data_file: Path, image_roots: Sequence[str] = ()) -> None:
        self.base = data_file.resolve().parent
        self.prefixes: list[tuple[str, Path]] = []
        self.roots: list[Path] = []
        for root in image_roots:
            if "=" in root:
                prefix, target = root.split("=", 1)
                self.prefixes.append((prefix.rstrip("/"), Path(target).expanduser()))
            else:
                self.roots.append(Path(root).expanduser())

    def __call__(self, raw: str) -> str:
        raw = str(raw)
        if "\x00" in raw:  # no file system accepts it; os functions raise ValueError
            raise DataError(f"image path {raw!r} contains a NUL character")
        for prefix, target in self.prefixes:
            if raw == prefix or raw.startswith(prefix + "/"):
                return str((target / raw[len(prefix) :].lstrip("/")).resolve())
        parts = Path(raw).parts
        if parts and parts[0] in _ELIDED:
            raw = str(Path(*parts[1:])) if len(parts) > 1 else ""
        path = Path(raw)
        if path.is_absolute():
            return str(path)
        if self.roots:
            for root in self.roots:
                if (root / path).exists():
                    return str((root / path).resolve())
            return str((self.roots[0] / path).resolve())
        return str((self.base / path).resolve())
