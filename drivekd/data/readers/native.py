"""The native format: JSONL, one `Sample` per line, image paths relative to the file (DriveSim-QA writes it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from drivekd.data.choices import answer_letter
from drivekd.data.paths import ImageResolver
from drivekd.data.readers.fields import (
    identifier,
    inline_choices,
    json_kind,
    json_object,
    optional_id,
    optional_text,
    question_text,
    required,
    scene_of_images,
    text_field,
    typed_field,
)
from drivekd.data.sample import ImageRef, Sample, normalize_capability
from drivekd.errors import DataError


def _choices_field(item: dict[str, Any], where: str) -> tuple[dict[str, str] | None, str | None]:
    choices, letter = item.get("choices"), item.get("correct_choice")
    if choices is not None and not (
        isinstance(choices, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in choices.items())
    ):
        raise DataError(f"{where}: field 'choices' must map letters to option texts")
    if letter is not None and not isinstance(letter, str):
        raise DataError(f"{where}: field 'correct_choice' must be a letter, got {json_kind(letter)}")
    return choices or None, letter


def read_native(file: Path, records: list[tuple[str, Any]], resolve: ImageResolver) -> Iterator[tuple[str, Sample]]:
    for where, item in records:
        item = json_object(item, where)
        images, raw_paths = [], []
        for k, im in enumerate(typed_field(item, "images", where, list, "a list")):
            im_where = f"{where} image {k}"
            raw = text_field(im, "path", im_where)
            raw_paths.append(raw)
            images.append(ImageRef(text_field(im, "camera", im_where), resolve(raw)))
        sample_id = identifier(required(item, "id", where), "id", where)
        capability = normalize_capability(text_field(item, "capability", where), where=where)
        question = question_text(text_field(item, "question", where), "question", where)
        answer = text_field(item, "answer", where)
        choices, letter = _choices_field(item, where)
        if choices is None:
            choices, inline_letter = inline_choices(question, answer)
            letter = letter if letter is not None else inline_letter
        elif letter is None:
            found = answer_letter(answer)
            letter = found if found in choices else None
        facts = item.get("facts")
        if facts is not None and not isinstance(facts, dict):
            raise DataError(f"{where}: field 'facts' must be an object, got {json_kind(facts)}")
        yield (
            where,
            Sample(
                id=sample_id,
                capability=capability,
                question_type=optional_text(item, "question_type", where) or capability,
                images=images,
                question=question,
                answer=answer,
                scene_id=optional_id(item, "scene_id", where) or scene_of_images(raw_paths) or sample_id,
                choices=choices,
                correct_choice=letter,
                facts=facts or {},
            ),
        )
