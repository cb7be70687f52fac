"""Parsing a data file: one JSON value, or JSON Lines records with where each came from; malformed JSON
and repeated keys are refused with the line and column, or the JSONPath, at fault."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from drivekd.errors import DataError


class JsonLines(list[tuple[str, Any]]):
    """A JSON Lines file's records: `(where, record)` pairs, blank lines skipped."""


def file_content(file: Path) -> Any:
    """The parsed file: a `JsonLines` of records for JSON Lines (a `.jsonl` file, or a `.json` file holding
    one object per line), else the one JSON value the file holds."""
    if file.suffix == ".jsonl" or _is_json_lines(file):
        return _json_lines(file)
    return read_json(file)


def _is_json_lines(file: Path) -> bool:
    """A `.json` file holding JSON Lines (one object per line): parsed whole it fails with "Extra data"
    at line 2, column 1, which names no real fault; read line by line, errors point at the line."""
    try:
        with open(file, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
            second = next((line for line in f if line.strip()), None)
    except (OSError, UnicodeDecodeError):
        return False
    if second is None:
        return False
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _json_lines(file: Path) -> JsonLines:
    out = JsonLines()
    try:
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = _loads(line, f"{file}:{lineno}")
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{lineno}:{e.colno}: malformed JSON: {e.msg}") from e
                out.append((f"{file}: item {len(out)} (line {lineno})", record))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: cannot read: {e}") from e
    return out


def read_json(file: Path) -> Any:
    """The one JSON value `file` holds (a byte-order mark allowed); DataError on malformed JSON or an
    object that repeats a key."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: cannot read: {e}") from e
    try:
        return _loads(text, str(file))
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from e


def _loads(text: str, where: str) -> Any:
    """`json.loads`, refusing an object that repeats a key: json keeps the last value and drops the
    others without a word (a DriveLM scene written twice loses the first one's questions)."""
    repeated: dict[int, str] = {}  # id(object) -> its first repeated key

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    repeated[id(obj)] = key
                    break
                seen.add(key)
        return obj

    data = json.loads(text, object_pairs_hook=pairs_hook)
    if repeated:
        path, key = _first_repeat(data, repeated)
        raise DataError(
            f"{where}: duplicate key {key!r} in the object at {path}; JSON keeps only the last value, so the "
            "others would be dropped silently"
        )
    return data


def _first_repeat(data: Any, repeated: dict[int, str]) -> tuple[str, str]:
    """JSONPath (`$["scene-a"]["key_frames"]`) of the first object, in document order, with a repeated key."""
    stack: list[tuple[str, Any]] = [("$", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            if id(value) in repeated:
                return path, repeated[id(value)]
            children = [(f"{path}[{json.dumps(k, ensure_ascii=False)}]", v) for k, v in value.items()]
        elif isinstance(value, list):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        stack.extend(reversed(children))
    raise AssertionError("a repeated key was seen but not found")  # pragma: no cover
