"""Loading data files: which format a file holds (told from its records' keys), dispatch to that format's
reader (`drivekd.data.readers`), checks across samples (ids, exact repeats), and the native JSONL writer.

Formats (docs/method.md §2):
- `native`: JSONL, one `Sample` per line, image paths relative to the file (DriveSim-QA writes it).
- `reference`: the reference code's JSON list of `{"messages", "images", "question_type"}`.
- `drivebench`: DriveBench's JSON list of `{"scene_token", "frame_token", "question_type",
  "question", "answer", "tag", "image_path": {camera: path}}`.
- `drivelm`: DriveLM-nuScenes' `{scene: {"key_frames": {frame: {"QA": {...}, "image_paths"}}}}`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from drivekd.atomic import atomic_file
from drivekd.data.paths import ImageResolver
from drivekd.data.readers.drivebench import read_drivebench
from drivekd.data.readers.drivelm import read_drivelm
from drivekd.data.readers.fields import json_kind, scene_of_images
from drivekd.data.readers.json_source import JsonLines, file_content
from drivekd.data.readers.native import read_native
from drivekd.data.readers.reference import read_reference
from drivekd.data.sample import Sample
from drivekd.errors import DataError

__all__ = [
    "FORMATS",
    "SPLITS",
    "data_files",
    "detect_format",
    "duplicates_message",
    "load_samples",
    "load_split",
    "scene_of_images",
    "write_jsonl",
]

FORMATS: tuple[str, ...] = ("native", "reference", "drivebench", "drivelm")
SPLITS: tuple[str, ...] = ("train", "val", "test")


def load_samples(path: str | Path, fmt: str | None = None, image_roots: Sequence[str] = ()) -> list[Sample]:
    """Read samples from a data file, or from every split file of a native dataset folder."""
    files = data_files(path)
    samples = [s for f in files for s in _load_file(f, fmt, image_roots)]
    _warn_duplicates(samples, str(path))
    return samples


def load_split(directory: str | Path, split: str, image_roots: Sequence[str] = ()) -> list[Sample]:
    """Read one split (`train`, `val`, `test`) of a native dataset folder."""
    file = Path(directory) / f"{split}.jsonl"
    if not file.is_file():
        raise DataError(f"{directory}: no {split}.jsonl in this dataset folder")
    samples = _load_file(file, "native", image_roots)
    _warn_duplicates(samples, str(file))
    return samples


def data_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = [path / f"{s}.jsonl" for s in SPLITS if (path / f"{s}.jsonl").is_file()]
        if not files:
            raise DataError(f"{path}: folder holds none of {', '.join(s + '.jsonl' for s in SPLITS)}")
        return files
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    return [path]


def detect_format(file: Path) -> str:
    """The format of a data file, told from the keys of its records (not from its extension)."""
    return _detect(file, file_content(file))


# Keys that mark a record of each record-per-item format. A record carrying keys of two formats is
# ambiguous and refused rather than guessed.
_RECORD_KEYS: dict[str, tuple[str, ...]] = {
    "native": ("capability",),
    "reference": ("messages",),
    "drivebench": ("image_path", "scene_token", "frame_token"),
}


def _record_format(record: Any, where: str) -> str | None:
    if not isinstance(record, dict):
        return None
    kinds = [fmt for fmt, keys in _RECORD_KEYS.items() if any(k in record for k in keys)]
    if len(kinds) > 1:
        marks = "; ".join(f"{k}: {', '.join(repr(x) for x in _RECORD_KEYS[k] if x in record)}" for k in kinds)
        raise DataError(f"{where}: record has keys of several formats ({marks}); pass --format")
    return kinds[0] if kinds else None


def _detect(file: Path, content: Any) -> str:
    if isinstance(content, JsonLines):
        if not content:
            return "native"  # an empty .jsonl: read as no samples
        where, first = content[0]
        return _record_format(first, where) or "native"  # native's reader names the missing fields
    if isinstance(content, list) and not content:
        raise DataError(f"{file}: holds no samples (an empty JSON list)")
    if isinstance(content, dict) and not content:
        raise DataError(f"{file}: holds no samples (an empty JSON object)")
    if isinstance(content, dict):
        fmt = _record_format(content, f"{file}: item 0")  # one record in a .json file
        if fmt is not None:
            return fmt
        first = next(iter(content.values()))
        if isinstance(first, dict) and "key_frames" in first:
            return "drivelm"
    if isinstance(content, list):
        fmt = _record_format(content[0], f"{file}: item 0")
        if fmt is not None:
            return fmt
    raise DataError(f"{file}: cannot tell the format (expected one of {', '.join(FORMATS)}); pass --format")


def _load_file(file: Path, fmt: str | None, image_roots: Sequence[str]) -> list[Sample]:
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"{file}: unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    content = file_content(file)
    fmt = fmt or _detect(file, content)
    resolve = ImageResolver(file, image_roots)
    if fmt == "drivelm":
        items: Iterator[tuple[str, Sample]] = read_drivelm(file, content, resolve)
    else:
        records = _records(file, content, fmt)
        if fmt == "native":
            items = read_native(file, records, resolve)
        elif fmt == "reference":
            items = read_reference(file, records, resolve)
        else:
            items = read_drivebench(records, resolve)
    samples = []
    seen: dict[str, str] = {}
    try:
        for where, sample in items:
            sample.check(where)
            if sample.id in seen:
                raise DataError(f"{where}: duplicate sample id {sample.id!r} (also {seen[sample.id]})")
            seen[sample.id] = where
            samples.append(sample)
    except DataError as e:
        if str(file) in str(e):
            raise
        raise DataError(f"{file}: {e}") from e  # e.g. the image resolver's, which knows no file
    return samples


def _warn_duplicates(samples: Sequence[Sample], source: str) -> None:
    """Exact repeats (same images, question and answer) are kept, and counted on stderr."""
    from drivekd.data.validate import duplicate_pairs

    pairs = duplicate_pairs(samples)
    if pairs:
        print(f"warning: {source}: {duplicates_message(pairs)}", file=sys.stderr)


def duplicates_message(pairs: Sequence[tuple[str, str]]) -> str:
    repeat, first = pairs[0]
    return (
        f"{len(pairs)} item(s) repeat an earlier item exactly (same images, question and answer); kept, so each "
        f"counts again in training and scoring (first: {repeat} repeats {first})"
    )


def _records(file: Path, content: Any, fmt: str) -> list[tuple[str, Any]]:
    """`(where, record)` for each item of a record-per-item format: JSON Lines, a JSON list, or one
    record alone in a `.json` file."""
    if isinstance(content, JsonLines):
        return list(content)
    if isinstance(content, list):
        return [(f"{file}: item {i}", item) for i, item in enumerate(content)]
    if isinstance(content, dict) and _record_format(content, f"{file}: item 0") == fmt:
        return [(f"{file}: item 0", content)]
    raise DataError(f"{file}: {fmt} format must be a JSON list of items or JSON Lines, got {json_kind(content)}")


def write_jsonl(samples: Sequence[Sample], out: str | Path) -> None:
    """Write samples as native JSONL (atomically); image paths become relative to the file."""
    out = Path(out)
    base = out.resolve().parent
    with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s.to_json(base), ensure_ascii=False, sort_keys=True) + "\n")
