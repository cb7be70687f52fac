"""Dataset checks shared by `drivekd data validate` and every command that trains on data."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from drivekd.data.sample import CAPABILITIES, Sample, marked_multiple_choice
from drivekd.errors import DataError


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
        if self.first_bad is None:
            return
        sample_id, path, problem = self.first_bad
        others = len(self.missing_images) + len(self.unreadable_images) - 1
        more = f" (and {others} more bad image(s))" if others else ""
        raise DataError(f"{source}: sample {sample_id}: image {path} is {problem}{more}")


def validate_samples(samples: Sequence[Sample], *, check_images: bool = True) -> ValidationReport:
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
    )
    if check_images:
        for path, sample_id in first_user.items():
            problem = image_problem(Path(path))
            if problem is None:
                continue
            (report.missing_images if problem == "missing" else report.unreadable_images).append(path)
            if report.first_bad is None:
                report.first_bad = (sample_id, path, problem)
    return report


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
        return f"unreadable ({type(e).__name__})"
    return None
