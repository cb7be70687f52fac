"""Dataset checks shared by `drivekd data validate` and every command that trains on data."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from drivekd.data.sample import CAPABILITIES, Sample, marked_multiple_choice
from drivekd.errors import DataError
from drivekd.progress import bar as progress_bar


@dataclass
class ValidationReport:
    samples: int
    by_capability: dict[str, int]
    by_question_type: dict[str, int]
    images_referenced: int
    missing_images: list[str] = field(default_factory=list)
    unreadable_images: list[str] = field(default_factory=list)
    first_bad: tuple[str, str, str] | None = None  # (sample id, path, problem)
    # Marked multiple choice by the source (DriveBench tag 0) but no `A. ... B. ...` options found:
    # scored as open-ended text unless fixed. Ids, in input order.
    mc_without_options: list[str] = field(default_factory=list)
    # Options found but no correct letter in the answer: the scorer refuses such items.
    mc_without_letter: list[str] = field(default_factory=list)
    multiple_choice: int = 0
    # Items that repeat an earlier one exactly (same images, question and answer): kept, counted.
    # (repeat id, first id) pairs, in input order.
    duplicates: list[tuple[str, str]] = field(default_factory=list)

    @property
    def duplicate_items(self) -> int:
        return len(self.duplicates)

    @property
    def ok(self) -> bool:
        return not self.missing_images and not self.unreadable_images and self.samples > 0

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "samples": self.samples,
            "by_capability": self.by_capability,
            "by_question_type": self.by_question_type,
            "images_referenced": self.images_referenced,
            "multiple_choice": self.multiple_choice,
            "duplicate_items": self.duplicate_items,
            "mc_without_options": self.mc_without_options,
            "mc_without_letter": self.mc_without_letter,
            "missing_images": self.missing_images,
            "unreadable_images": self.unreadable_images,
        }

    def raise_if_bad(self, source: str, *, strict: bool = False) -> None:
        if self.samples == 0:
            raise DataError(f"{source}: no samples")
        if strict and self.mc_without_letter:
            n = len(self.mc_without_letter)
            raise DataError(
                f"{source}: sample {self.mc_without_letter[0]}: has options but its answer names none of their "
                "letters" + (f" (and {n - 1} more)" if n > 1 else "")
            )
        if strict and self.mc_without_options:
            n = len(self.mc_without_options)
            raise DataError(
                f"{source}: sample {self.mc_without_options[0]}: marked multiple choice (tag 0) but no "
                f"'A. ... B. ...' options found in its question" + (f" (and {n - 1} more)" if n > 1 else "")
            )
        if strict and self.duplicates:
            from drivekd.data.formats import duplicates_message

            raise DataError(f"{source}: {duplicates_message(self.duplicates)}")
        if self.first_bad is None:
            return
        sample_id, path, problem = self.first_bad
        others = len(self.missing_images) + len(self.unreadable_images) - 1
        more = f" (and {others} more bad image(s))" if others else ""
        raise DataError(f"{source}: sample {sample_id}: image {path} is {problem}{more}")


def validate_samples(
    samples: Sequence[Sample], *, check_images: bool = True, progress: bool | None = None
) -> ValidationReport:
    """Counts, and every distinct image checked to exist and decode (each file once): a truncated
    image is found here, before training starts, not at the step that first reads it.
    `progress`: a bar on stderr (None: only when stderr is a terminal)."""
    by_cap = Counter({c: 0 for c in CAPABILITIES})
    by_cap.update(s.capability for s in samples)
    by_type = Counter(s.question_type for s in samples)
    first_user: dict[str, str] = {}
    for s in samples:
        for im in s.images:
            first_user.setdefault(im.path, s.id)
    report = ValidationReport(
        samples=len(samples),
        by_capability=dict(by_cap),
        by_question_type=dict(sorted(by_type.items())),
        images_referenced=len(first_user),
        multiple_choice=sum(1 for s in samples if s.choices),
        mc_without_options=[s.id for s in samples if not s.choices and marked_multiple_choice(s)],
        mc_without_letter=[s.id for s in samples if s.choices and s.correct_choice is None],
        duplicates=duplicate_pairs(samples),
    )
    if check_images:
        for sample_id, path, problem in check_images_decode(samples, progress=progress):
            (report.missing_images if problem == "missing" else report.unreadable_images).append(path)
            if report.first_bad is None:
                report.first_bad = (sample_id, path, problem)
    return report


def duplicate_pairs(samples: Sequence[Sample]) -> list[tuple[str, str]]:
    """`(repeat id, first id)` for every sample that repeats an earlier one exactly: the same cameras
    and image files, the same question and the same answer. Such items are kept by every reader."""
    first: dict[tuple[object, ...], str] = {}
    pairs = []
    for s in samples:
        key = (tuple((im.camera, im.path) for im in s.images), s.question, s.answer)
        if key in first:
            pairs.append((s.id, first[key]))
        else:
            first[key] = s.id
    return pairs


def duplicate_items(samples: Sequence[Sample]) -> int:
    """How many samples repeat an earlier one exactly (see `duplicate_pairs`); 0 for clean data."""
    return len(duplicate_pairs(samples))


def check_images_decode(
    samples: Sequence[Sample], *, progress: bool | None = True, workers: int | None = None
) -> list[tuple[str, str, str]]:
    """`(sample id, image path, problem)` for every distinct image that is missing or does not
    decode (every pixel read), named with the first sample that uses it; [] when all decode.
    Each file is decoded once, in `workers` threads (PIL decodes outside the GIL).
    `progress`: a bar on stderr (None: only when stderr is a terminal)."""
    first_user: dict[str, str] = {}
    for s in samples:
        for im in s.images:
            first_user.setdefault(im.path, s.id)
    paths = list(first_user)
    if not paths:
        return []
    workers = workers or min(8, os.cpu_count() or 1)
    bad = []
    bar = progress_bar(total=len(paths), desc="decoding images", unit="image", disable=_quiet(progress))
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        for path, problem in zip(paths, pool.map(_decode_problem, paths, chunksize=16), strict=True):
            bar.update()
            if problem is not None:
                bad.append((first_user[path], path, problem))
    return bad


def _quiet(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # tqdm: None disables on a non-terminal


def _decode_problem(path: str) -> str | None:
    return image_problem(Path(path), decode=True)


def image_problem(path: Path, *, decode: bool = False) -> str | None:
    """None for a good image, else "missing" / "unreadable (...)". `verify` checks the file's
    structure; `decode` reads every pixel too (catches a truncated file; slower)."""
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as im:
            if decode:
                im.load()
            else:
                im.verify()
    except Exception as e:  # PIL raises many types for corrupt files
        return f"unreadable ({type(e).__name__}: {_first_line(e, path)})"
    return None


def _first_line(e: Exception, path: Path) -> str:
    lines = str(e).replace(repr(str(path)), "the file").replace(str(path), "the file").strip().splitlines()
    return lines[0][:120] if lines else "no message"
