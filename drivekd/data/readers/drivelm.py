"""The DriveLM-nuScenes format: `{scene: {"key_frames": {frame: {"QA": {question type: [{"Q", "A"}]},
"image_paths": {camera: path}}}}}`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from drivekd.data.paths import ImageResolver
from drivekd.data.readers.fields import (
    camera_paths,
    inline_choices,
    json_kind,
    nonempty_string,
    text_field,
    typed_field,
    with_placeholders,
)
from drivekd.data.readers.json_source import JsonLines
from drivekd.data.sample import ImageRef, Sample, normalize_capability
from drivekd.errors import DataError


def read_drivelm(file: Path, data: Any, resolve: ImageResolver) -> Iterator[tuple[str, Sample]]:
    if not isinstance(data, dict) or isinstance(data, JsonLines):
        raise DataError(f"{file}: DriveLM format must be one JSON object keyed by scene id, got {json_kind(data)}")
    for scene_id, scene in data.items():
        nonempty_string(scene_id, "scene id", f"{file}: scene {scene_id!r}")
        frames = typed_field(scene, "key_frames", f"{file}: scene {scene_id}", dict, "an object of frames")
        for frame_id, frame in frames.items():
            fwhere = f"{file}: scene {scene_id} frame {frame_id}"
            nonempty_string(frame_id, "frame id", fwhere)
            qa = typed_field(frame, "QA", fwhere, dict, "an object of question lists")
            paths = camera_paths(frame, "image_paths", fwhere)
            images = [ImageRef(cam, resolve(p)) for cam, p in paths.items()]
            for qtype, items in qa.items():
                if not isinstance(items, list):
                    raise DataError(f"{fwhere}: QA {qtype!r} must be a list of questions, got {json_kind(items)}")
                capability = normalize_capability(qtype, where=f"{fwhere} QA {qtype!r}")
                for k, item in enumerate(items):
                    where = f"{fwhere} {qtype}[{k}]"
                    question = text_field(item, "Q", where)
                    answer = text_field(item, "A", where)
                    choices, letter = inline_choices(question, answer)
                    yield (
                        where,
                        Sample(
                            id=f"{frame_id}:{qtype}:{k}",
                            capability=capability,
                            question_type=qtype.lower(),
                            images=list(images),
                            question=with_placeholders(question, list(paths)),
                            answer=answer,
                            scene_id=scene_id,
                            choices=choices,
                            correct_choice=letter,
                        ),
                    )
