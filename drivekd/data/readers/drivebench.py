"""The DriveBench format: a JSON list of `{"scene_token", "frame_token", "question_type", "question",
"answer", "tag", "image_path": {camera: path}}`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from drivekd.data.paths import ImageResolver
from drivekd.data.readers.fields import (
    camera_paths,
    inline_choices,
    json_kind,
    json_object,
    optional_text,
    scene_of_images,
    text_field,
    with_placeholders,
)
from drivekd.data.sample import ImageRef, Sample, normalize_capability
from drivekd.errors import DataError


def _tag(item: dict[str, Any], where: str) -> dict[str, Any]:
    """DriveBench's `tag`: a number or string, or a list of them (0 marks multiple choice)."""
    if "tag" not in item:
        return {}
    tag = item["tag"]
    ok = tag is None or (isinstance(tag, int | str) and not isinstance(tag, bool))
    if isinstance(tag, list):
        ok = all(isinstance(t, int | str) and not isinstance(t, bool) for t in tag)
    if not ok:
        raise DataError(f"{where}: field 'tag' must be a number, a string or a list of them, got {json_kind(tag)}")
    return {"tag": tag}


def read_drivebench(records: list[tuple[str, Any]], resolve: ImageResolver) -> Iterator[tuple[str, Sample]]:
    for i, (where, item) in enumerate(records):
        item = json_object(item, where)
        qtype = text_field(item, "question_type", where)
        capability = normalize_capability(qtype, where=where)
        paths = camera_paths(item, "image_path", where)
        question = text_field(item, "question", where)
        answer = text_field(item, "answer", where)
        choices, letter = inline_choices(question, answer)
        frame = optional_text(item, "frame_token", where)
        scene = optional_text(item, "scene_token", where) or frame or scene_of_images(list(paths.values()))
        sample_id = f"{frame or f'frame{i}'}:{i}"
        yield (
            where,
            Sample(
                id=sample_id,
                capability=capability,
                question_type=qtype.lower(),
                images=[ImageRef(cam, resolve(p)) for cam, p in paths.items()],
                question=with_placeholders(question, list(paths)),
                answer=answer,
                scene_id=scene or sample_id,
                choices=choices,
                correct_choice=letter,
                facts=_tag(item, where),
            ),
        )
