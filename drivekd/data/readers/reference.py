"""The reference format: the reference code's JSON list of `{"messages", "images", "question_type"}`,
single-turn (one user and one assistant message per item)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from drivekd.data.paths import ImageResolver
from drivekd.data.readers.fields import (
    inline_choices,
    json_object,
    nonempty_string,
    optional_id,
    optional_text,
    question_text,
    scene_of_images,
    text_field,
    typed_field,
)
from drivekd.data.sample import ImageRef, Sample, normalize_capability
from drivekd.errors import DataError

_CAMERA_IN_PATH = re.compile(r"(CAM_[A-Z_]+?)(?:__|/|\.|$)")


def _camera_name(path: str, index: int, count: int) -> str:
    m = _CAMERA_IN_PATH.search(path)
    if m:
        return m.group(1)
    return "CAM_FRONT" if count == 1 else f"IMAGE_{index}"


def _message(messages: list[Any], role: str, where: str) -> str:
    """The content of the one message with this role (a second one would be dropped: refused)."""
    found = []
    for j, m in enumerate(messages):
        m = json_object(m, f"{where} messages[{j}]")
        if nonempty_string(m.get("role"), f"messages[{j}].role", where) == role:
            found.append(nonempty_string(m.get("content"), f"messages[{j}].content", where))
    if not found:
        raise DataError(f"{where}: missing required field 'messages[role={role}]'")
    if len(found) > 1:
        raise DataError(f"{where}: {len(found)} messages with role {role!r}; only single-turn items are supported")
    return found[0]


def read_reference(file: Path, records: list[tuple[str, Any]], resolve: ImageResolver) -> Iterator[tuple[str, Sample]]:
    for i, (where, item) in enumerate(records):
        messages = typed_field(item, "messages", where, list, "a list")
        raw_images = typed_field(item, "images", where, list, "a list")
        capability_name = text_field(item, "question_type", where)
        for k, p in enumerate(raw_images):
            nonempty_string(p, f"images[{k}]", where)
        question = question_text(_message(messages, "user", where), "messages[role=user].content", where)
        answer = _message(messages, "assistant", where)
        images = [ImageRef(_camera_name(p, k, len(raw_images)), resolve(p)) for k, p in enumerate(raw_images)]
        choices, letter = inline_choices(question, answer)
        sample_id = optional_id(item, "id", where) or f"{file.stem}-{i}"
        yield (
            where,
            Sample(
                id=sample_id,
                capability=normalize_capability(capability_name, where=where),
                question_type=optional_text(item, "question_subtype", where) or capability_name,
                images=images,
                question=question,
                answer=answer,
                scene_id=optional_id(item, "scene_id", where) or scene_of_images(raw_images) or sample_id,
                choices=choices,
                correct_choice=letter,
            ),
        )
