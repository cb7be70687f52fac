"""The one sample type every part of drivekd reads and writes."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivekd.errors import DataError

CAPABILITIES: tuple[str, ...] = ("perception", "reasoning", "planning")
IMAGE_PLACEHOLDER = "<image>"
# DriveLM object tags: `<c1,CAM_FRONT,0.4911,0.5273>` (fractions of the image) or pixel coordinates.
OBJECT_TAG = re.compile(r"<c\d+,(CAM_[A-Z_]+),([0-9.]+),([0-9.]+)>")

# DriveBench's prediction and behavior questions both test reasoning (docs/method.md §2).
_CAPABILITY_ALIASES: dict[str, str] = {
    "perception": "perception",
    "perceptual": "perception",
    "perceive": "perception",
    "reasoning": "reasoning",
    "reason": "reasoning",
    "prediction": "reasoning",
    "predict": "reasoning",
    "behavior": "reasoning",
    "behaviour": "reasoning",
    "planning": "planning",
    "plan": "planning",
    "decision": "planning",
}


def capability_of(name: object) -> str | None:
    """The capability a name or alias (case-insensitive) means; None for anything else."""
    return _CAPABILITY_ALIASES.get(name.strip().lower()) if isinstance(name, str) else None


def normalize_capability(name: str, *, where: str) -> str:
    """Map a capability name or alias (case-insensitive) to perception | reasoning | planning."""
    capability = capability_of(str(name))
    if capability is None:
        accepted = ", ".join(sorted(_CAPABILITY_ALIASES))
        raise DataError(f"{where}: unknown capability {name!r}; accepted: {accepted}")
    return capability


@dataclass(frozen=True)
class ImageRef:
    """One camera image of a sample. `path` is absolute once a reader has resolved it."""

    camera: str
    path: str


@dataclass
class Sample:
    """A driving question with its answer and, where known, scorer ground truth.

    `question` holds one `<image>` placeholder per entry of `images`, in order. `choices` maps
    letters to option texts for multiple-choice items; `correct_choice` is the right letter.
    `facts` is structured ground truth for open-ended scoring (e.g. `action`, `safe_actions`).
    """

    id: str
    capability: str
    question_type: str
    images: list[ImageRef]
    question: str
    answer: str
    scene_id: str
    choices: dict[str, str] | None = None
    correct_choice: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def to_json(self, image_base: Path | None = None) -> dict[str, Any]:
        """Plain-JSON form; image paths are written relative to `image_base` when it is given."""
        out = dataclasses.asdict(self)
        out["images"] = [{"camera": im.camera, "path": _relative(im.path, image_base)} for im in self.images]
        if self.choices is None:
            del out["choices"], out["correct_choice"]
        return out

    def check(self, where: str) -> None:
        """Raise DataError if the sample is internally inconsistent."""
        placeholders = self.question.count(IMAGE_PLACEHOLDER)
        if placeholders != len(self.images):
            raise DataError(
                f"{where}: question has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
                f"but {len(self.images)} image(s)"
            )
        if self.capability not in CAPABILITIES:
            raise DataError(f"{where}: capability {self.capability!r} is not normalised")
        if self.choices is not None and self.correct_choice is not None:
            if self.correct_choice not in self.choices:
                raise DataError(
                    f"{where}: correct_choice {self.correct_choice!r} is not one of the choices {sorted(self.choices)}"
                )


def _relative(path: str, base: Path | None) -> str:
    if base is None:
        return path
    p = Path(path)
    if not p.is_absolute():
        return path
    return os.path.relpath(p, base.resolve())


def with_other_images(samples: list[Sample], pool: list[Sample] | None = None) -> list[Sample]:
    """The image-blind control: every sample shown the cameras of another scene.

    A model whose answers and losses do not change under this swap does not read the images
    (DriveBench reports as much of real VLMs). Samples are grouped by their camera list; within a
    group, scenes are taken in order of first appearance and scene k gets the images of scene k+1
    (cyclically), so no sample keeps its own scene. `pool`: the samples whose scenes may lend their
    images (default: `samples` themselves), e.g. the whole split when `samples` is its first N, which
    may all come from one scene. A group with a single scene cannot be swapped and is returned
    unchanged: `unswappable` counts such samples, which a caller must report (or refuse), since their
    control score is their real score. Deterministic: the same list gives the same swap on every rank.
    """
    scenes_of: dict[tuple[str, ...], list[str]] = {}
    images_of: dict[tuple[tuple[str, ...], str], list[ImageRef]] = {}
    for s in [*(pool or []), *samples]:
        key = (tuple(im.camera for im in s.images), s.scene_id)
        if key not in images_of:
            images_of[key] = s.images
            scenes_of.setdefault(key[0], []).append(key[1])
    position = {(cameras, scene): i for cameras, scenes in scenes_of.items() for i, scene in enumerate(scenes)}
    out = []
    for s in samples:
        cameras, scene = tuple(im.camera for im in s.images), s.scene_id
        scenes = scenes_of[cameras]
        donor = scenes[(position[(cameras, scene)] + 1) % len(scenes)]  # itself when the group has one scene
        out.append(s if donor == scene else dataclasses.replace(s, images=list(images_of[(cameras, donor)])))
    return out


def unswappable(samples: list[Sample], pool: list[Sample] | None = None) -> int:
    """How many samples `with_other_images(samples, pool)` leaves showing their own images: no other
    scene with the same camera list, no images at all, or a donor scene whose images are the same files."""
    swapped = with_other_images(samples, pool)
    return sum(
        1
        for before, after in zip(samples, swapped, strict=True)
        if not before.images or [im.path for im in after.images] == [im.path for im in before.images]
    )


def image_blind_control(
    samples: list[Sample], *, source: str, pool: list[Sample] | None = None
) -> tuple[list[Sample], int]:
    """`with_other_images(samples, pool)` and how many samples still show their own images
    (`unswappable`). A DataError when every sample would: the control would be the real score."""
    kept_own = unswappable(samples, pool)
    if samples and kept_own == len(samples):
        raise DataError(
            f"{source}: no sample can be shown another scene's images (every scene is alone among those with "
            "its camera list, or has no images), so the image-blind control would equal the real score"
        )
    return with_other_images(samples, pool), kept_own


def marked_multiple_choice(sample: Sample) -> bool:
    """Does the source mark this item multiple choice? DriveBench's `tag` 0 does (kept in `facts`),
    written as 0, "0", [0] or ["0"] depending on the file."""
    tag = sample.facts.get("tag") if isinstance(sample.facts, dict) else None
    tags = tag if isinstance(tag, list) else [tag]
    return any(str(t).strip() == "0" for t in tags if t is not None and not isinstance(t, bool))


def object_tags(text: str) -> list[tuple[str, float, float]]:
    """The distinct `(camera, x, y)` object tags in `text`, in order of first mention."""
    seen: dict[tuple[str, float, float], None] = {}
    for cam, x, y in OBJECT_TAG.findall(text):
        try:
            seen[(cam, float(x), float(y))] = None
        except ValueError:  # e.g. "1.2.3": not a coordinate
            continue
    return list(seen)


def tag_fraction(x: float, y: float, width: int, height: int) -> tuple[float, float] | None:
    """An object tag's point as fractions of its image: tags are written as fractions (both in
    [0, 1]) or, in DriveLM, as pixel coordinates (either above 1), which must lie inside the image.
    None for a tag that is neither (e.g. pixels beyond the image: another image size)."""
    if 0 <= x <= 1 and 0 <= y <= 1:
        return x, y
    if 0 <= x <= width and 0 <= y <= height:
        return x / width, y / height
    return None


# DriveBench-style replies commit to an answer in `Final: {...}`: the part of an answer that scores.
DECISION = re.compile(r"Final\s*:\s*\{[^}]*\}")


def decision_span(answer: str) -> tuple[int, int] | None:
    """Character span of the committed answer (`Final: {...}`) in an answer, if it has one."""
    m = DECISION.search(answer)
    return None if m is None else (m.start(), m.end())


def focus_object(sample: Sample, *, with_answer: bool = True) -> tuple[str, float, float] | None:
    """The `(camera, x, y)` of the object a sample is about: the question's one object tag, else (when
    the answer is known) the answer's, e.g. the vehicle a "nearest ahead" answer names or the chosen
    one of several tagged options. None when neither names exactly one, or its camera is not shown."""
    tags = object_tags(sample.question)
    if len(tags) != 1 and with_answer:
        tags = object_tags(sample.answer)
    if len(tags) != 1 or tags[0][0] not in [ref.camera for ref in sample.images]:
        return None
    return tags[0]
