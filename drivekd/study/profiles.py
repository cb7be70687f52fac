"""What a `drivekd reproduce` study runs, as data: a profile (profiles.yaml, or a file of your own),
its student variants (variants.yaml) and how every student trains (student.yaml).

Everything a study's results depend on is in its `settings()`, so `study.json` can refuse a folder
made with other settings. Every number has a domain (drivekd/domains.py), checked when the file is
read.
"""

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from drivekd.domains import NonNegativeInt, OpenFraction, PositiveFloat, PositiveInt
from drivekd.errors import DriveKDError, closest
from drivekd.eval.corruptions import CORRUPTIONS, DEFAULT_SEVERITY, InputSetting
from drivekd.train.config import CombineConfig, DistillConfig, validate_config
from drivekd.yamlfile import read_yaml

HERE = Path(__file__).parent
PROFILES_FILE = HERE / "profiles.yaml"
VARIANTS_FILE = HERE / "variants.yaml"
# how every student of a study trains, beside its profile's and variant's settings: the sections of a
# `drivekd sft` / `drivekd distill` config that the study does not set itself
STUDENT_FILE = HERE / "student.yaml"
STUDENT: dict[str, dict[str, Any]] = read_yaml(STUDENT_FILE)
FORMAT = 2  # of study.json's settings: 2, a variant's definition always names its mixing

_STRICT = ConfigDict(extra="forbid", frozen=True)
# the distillation config's own domains for what a variant sets in it (annotations evaluated at
# class creation, no `from __future__ import annotations`: these are objects, not names)
Strategy = CombineConfig.model_fields["strategy"].annotation
Mixing = DistillConfig.model_fields["mixing"].annotation


class Variant(BaseModel):
    """One student variant: what it distils (if anything) and how its gradients are combined."""

    model_config = _STRICT
    name: str
    recipe: str = Field("none", description="none (CE only), a shipped recipe, or `prestudy` (the pre-study's)")
    per_capability: bool = Field(False, description="one student per capability, on that capability's split")
    strategy: Strategy = "sum"  # type: ignore[valid-type]
    amortize_every: PositiveInt | None = None
    kd_share: PositiveFloat | None = Field(None, description="overrides the profile's kd_share")
    mixing: Mixing = "reference"  # type: ignore[valid-type]

    @property
    def distills(self) -> bool:
        return self.recipe != "none"

    def definition(self) -> dict[str, Any]:
        """The fields results depend on."""
        return self.model_dump(mode="json")


def load_variants(path: Path = VARIANTS_FILE) -> dict[str, Variant]:
    raw = read_yaml(path) or {}
    return {
        name: validate_config(Variant, {"name": name, **(fields or {})}, f"{path}: variant {name!r}")
        for name, fields in raw.items()
    }


VARIANTS = load_variants()
Split = tuple[OpenFraction, OpenFraction, OpenFraction]


class Robustness(BaseModel):
    """DriveBench's robustness settings in a study (profiles.yaml says what each field is for)."""

    model_config = _STRICT
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)
    severity: Annotated[int, Field(ge=1, le=5)] = DEFAULT_SEVERITY
    text_only: bool = True
    samples: PositiveInt = 256
    seed: NonNegativeInt = 0

    @field_validator("corruptions", mode="before")
    @classmethod
    def _all_or_listed(cls, value: Any) -> Any:
        return tuple(CORRUPTIONS) if value == "all" else value

    @field_validator("corruptions")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if name not in CORRUPTIONS:
                close = closest(name, CORRUPTIONS)
                raise ValueError(f"unknown corruption {name!r}" + (f" (did you mean {close!r}?)" if close else ""))
        if len(set(value)) != len(value):
            raise ValueError("a corruption is named twice")
        return value

    def settings(self) -> dict[str, InputSetting]:
        """Each setting by the file stem of its predictions (`fog-3`, `text_only`)."""
        out = {
            f"{name}-{self.severity}": InputSetting(name, self.severity, seed=self.seed) for name in self.corruptions
        }
        if self.text_only:
            out["text_only"] = InputSetting(text_only=True, seed=self.seed)
        return out


class Profile(BaseModel):
    """A study's data, models, budgets and variants (profiles.yaml says what each field is for)."""

    model_config = _STRICT
    name: str
    scenes: PositiveInt
    data_seed: NonNegativeInt
    student_epochs: PositiveFloat
    student_lr: PositiveFloat
    seeds: Annotated[tuple[NonNegativeInt, ...], Field(min_length=1)]
    variants: tuple[str, ...]
    split: Split = (0.8, 0.1, 0.1)
    teacher: str = "drivesim-internvl-teacher"
    student: str = "drivesim-internvl-student-base"
    kd_share: PositiveFloat = 0.1
    prestudy_samples: PositiveInt = 96
    bench_repeats: PositiveInt = 5
    bench_score: bool = True
    eval_max_new_tokens: PositiveInt = 96
    eval_batch_size: PositiveInt = 64
    mechanism_samples: PositiveInt = 256
    robustness: Robustness | None = None

    @field_validator("variants", mode="before")
    @classmethod
    def _all_or_listed(cls, value: Any) -> Any:
        return tuple(VARIANTS) if value == "all" else value

    @field_validator("variants")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if name not in VARIANTS:
                close = closest(name, VARIANTS)
                raise ValueError(f"unknown variant {name!r}" + (f" (did you mean {close!r}?)" if close else ""))
        if len(set(value)) != len(value):
            raise ValueError("a variant is named twice")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(value)) != len(value):
            raise ValueError("a seed is named twice")
        return value

    @field_validator("split")
    @classmethod
    def _split_is_whole(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if abs(sum(value) - 1) > 1e-6 or min(value) <= 0:
            raise ValueError(f"train, val and test fractions must be > 0 and sum to 1, not {list(value)}")
        return value

    def settings(self) -> dict[str, Any]:
        """Everything results depend on (written to study.json, compared on resume)."""
        fields = self.model_dump(mode="json")
        if fields["robustness"] is None:  # so a study begun before the field existed still resumes
            del fields["robustness"]
        return {
            **fields,
            "format": FORMAT,
            "variant_definitions": {v: VARIANTS[v].definition() for v in self.variants},
            "student_training": STUDENT,  # student.yaml edited: the study's students train otherwise
        }


def _parse(raw: Any, source: Path, name: str) -> Profile:
    if not isinstance(raw, dict):
        raise DriveKDError(f"{source}: {name}: a profile maps its fields to values")
    raw = dict(raw)
    base = raw.pop("extends", None)
    if base is not None:
        if base not in _SHIPPED_RAW:
            raise DriveKDError(f"{source}: {name}: extends {base!r}, not a shipped profile ({', '.join(_SHIPPED_RAW)})")
        raw = {**_SHIPPED_RAW[base], **raw}
    raw.setdefault("name", name)
    return validate_config(Profile, raw, f"{source}: {name}")


_SHIPPED_RAW: dict[str, dict[str, Any]] = read_yaml(PROFILES_FILE)
PROFILES: dict[str, Profile] = {name: _parse(raw, PROFILES_FILE, name) for name, raw in _SHIPPED_RAW.items()}


def load_profile(spec: str | Path) -> Profile:
    """A shipped profile by name, or a profile file (its name defaults to the file's stem)."""
    if str(spec) in PROFILES:
        return PROFILES[str(spec)]
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        raise DriveKDError(
            f"unknown profile {str(spec)!r}: a shipped profile ({', '.join(PROFILES)}) or a profile YAML file"
        )
    return _parse(read_yaml(path), path, path.stem)
