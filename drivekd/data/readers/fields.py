"""Typed fields: every value a reader takes is checked where it is read; plus the values readers derive
from fields (inline multiple-choice options, image placeholders, a scene id from image paths)."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

from drivekd.data.choices import answer_letter, parse_inline_options
from drivekd.data.sample import IMAGE_PLACEHOLDER
from drivekd.errors import DataError


def json_kind(value: Any) -> str:
    """A JSON value's type, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def json_object(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {json_kind(item)}")
    return item


def required(item: Any, key: str, where: str) -> Any:
    item = json_object(item, where)
    if key not in item or item[key] is None:
        raise DataError(f"{where}: missing required field {key!r}")
    return item[key]


def typed_field(item: Any, key: str, where: str, kind: type, what: str) -> Any:
    value = required(item, key, where)
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {key!r} must be {what}, got {json_kind(value)}")
    return value


def nonempty_string(value: Any, field: str, where: str) -> str:
    """A text value: a string with more than white space (an empty question or answer trains and
    scores nothing)."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {json_kind(value)}")
    if not value.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return value


def text_field(item: Any, key: str, where: str) -> str:
    return nonempty_string(required(item, key, where), key, where)


def identifier(value: Any, field: str, where: str) -> str:
    """An id: text, or a whole number written without quotes (`"id": 7` is id "7"); nothing else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return nonempty_string(value, field, where)


def optional_id(item: dict[str, Any], key: str, where: str) -> str | None:
    value = item.get(key)
    return None if value is None else identifier(value, key, where)


def optional_text(item: dict[str, Any], key: str, where: str) -> str | None:
    """Absent or null: None. Present: a non-empty string, else an error (not a silent default)."""
    value = item.get(key)
    return None if value is None else nonempty_string(value, key, where)


def question_text(value: str, field: str, where: str) -> str:
    if not value.replace(IMAGE_PLACEHOLDER, "").strip():
        raise DataError(f"{where}: field {field!r} holds no text besides {IMAGE_PLACEHOLDER} placeholders")
    return value


def camera_paths(item: dict[str, Any], key: str, where: str) -> dict[str, str]:
    """`{camera: path}`: non-empty strings both."""
    paths = required(item, key, where)
    if not isinstance(paths, dict):
        raise DataError(f"{where}: field {key!r} must map camera names to paths, got {json_kind(paths)}")
    for cam, p in paths.items():
        nonempty_string(cam, f"{key}: camera", where)
        nonempty_string(p, f"{key}[{cam!r}]", where)
    return paths


def inline_choices(question: str, answer: str) -> tuple[dict[str, str] | None, str | None]:
    """Options written out in the question (`A. ...`), and the answer's letter when it names one of them."""
    options = parse_inline_options(question)
    if options is None:
        return None, None
    letter = answer_letter(answer)
    return options, letter if letter in options else None


def with_placeholders(question: str, cameras: Sequence[str]) -> str:
    """DriveBench/DriveLM questions carry no placeholders: prepend one per camera, in order."""
    if question.count(IMAGE_PLACEHOLDER) == len(cameras):
        return question
    header = "".join(f"{cam}: {IMAGE_PLACEHOLDER}\n" for cam in cameras)
    return header + question


_CAMERA_FOLDER = re.compile(r"CAM_[A-Z_]+")


def scene_of_images(raw_paths: Sequence[str]) -> str | None:
    """The scene id of a sample whose format names no scene: its first image's path as the data file
    writes it, directory included, without a leading `...` and without a camera folder
    (`samples/CAM_FRONT/0001.jpg` and `samples/CAM_BACK/0001.jpg` are one frame, `samples/0001.jpg`).
    Never the file name alone: four scenes' `CAM_FRONT/0001.jpg` are four scenes. None without images."""
    if not raw_paths:
        return None
    parts = list(PurePosixPath(posixpath.normpath(str(raw_paths[0]).replace("\\", "/"))).parts)
    if parts and parts[0] in ("...", "…"):
        parts = parts[1:]
    kept = [p for p in parts[:-1] if not _CAMERA_FOLDER.fullmatch(p)] + parts[-1:]
    return "/".join(kept).replace("//", "/") or None
