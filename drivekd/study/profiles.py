"""What a `drivekd reproduce` study runs: a profile (sizes, budgets, seeds) and its student variants.

Variants are data (`variants.yaml`); a profile picks some of them. Everything a study's results depend
on is in the profile, so `study.json` can refuse a directory made with other settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from drivekd.errors import DriveKDError
from drivekd.train.config import DistillConfig
from drivekd.yamlfile import read_yaml

VARIANTS_FILE = Path(__file__).with_name("variants.yaml")
# how every student trains, beside its profile's and variant's settings
STUDENT: dict[str, dict[str, Any]] = read_yaml(Path(__file__).with_name("student.yaml"))
_VARIANT_KEYS = {"recipe", "per_capability", "strategy", "amortize_every", "kd_share", "mixing"}
_MIXING = TypeAdapter(DistillConfig.model_fields["mixing"].annotation)  # the distillation config's own rule


@dataclass(frozen=True)
class Variant:
    name: str
    recipe: str = "none"
    per_capability: bool = False
    strategy: str = "sum"
    amortize_every: int | None = None
    kd_share: float | None = None
    mixing: str | list[list[float]] = "reference"

    @property
    def distills(self) -> bool:
        return self.recipe != "none"

    def definition(self) -> dict[str, Any]:
        """The fields results depend on. `mixing` came later and is left out at its default, so
        studies begun before it resume."""
        out = dataclasses.asdict(self)
        if out["mixing"] == "reference":
            del out["mixing"]
        return out


def load_variants(path: Path = VARIANTS_FILE) -> dict[str, Variant]:
    raw = read_yaml(path) or {}
    out = {}
    for name, fields in raw.items():
        unknown = set(fields) - _VARIANT_KEYS
        if unknown:
            raise DriveKDError(f"{path}: variant {name!r}: unknown field(s) {sorted(unknown)}")
        if "mixing" in fields:
            try:  # checked before a study starts, not when its student begins training
                _MIXING.validate_python(fields["mixing"])
            except ValidationError:
                raise DriveKDError(
                    f"{path}: variant {name!r}: mixing must be identity, reference or a matrix (a list of rows "
                    f"of numbers), not {fields['mixing']!r}"
                ) from None
        out[name] = Variant(name=name, **fields)
    return out


@dataclass(frozen=True)
class Profile:
    name: str
    scenes: int  # DriveSim-QA scenes (about 7.8 samples each), split by `split`
    data_seed: int
    student_epochs: float
    student_lr: float
    seeds: tuple[int, ...]
    variants: tuple[str, ...]
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / val / test fractions of the scenes
    # The situation of a Drive-KD user: a teacher stronger than anything they can fine-tune in their
    # budget, a small student that already reads images and answers multiple choice, a small task set.
    teacher: str = "drivesim-internvl-teacher"
    student: str = "drivesim-internvl-student-base"
    # Loss-weight calibration: each signal's weight makes its loss `kd_share` x the CE loss on the
    # untrained student (attention MSEs are 1e-7..1e-5 at weight 1, so fixed weights are meaningless).
    # CE falls ~15x during training while attention losses fall less, so a small share at the start
    # is already a large one later.
    kd_share: float = 0.1
    prestudy_samples: int = 96
    bench_repeats: int = 5
    # score every deployment-table row on the test split (the int8 row's accuracy); the teacher's and
    # students' own scores are in the study's tables either way
    bench_score: bool = True
    eval_max_new_tokens: int = 96
    # samples per generate() call: larger batches spend less time per decoded token (docs/results.md)
    eval_batch_size: int = 64
    mechanism_samples: int = 256  # test items the attention-mass measurement reads per model

    def settings(self) -> dict[str, Any]:
        """Everything results depend on (written to study.json, compared on resume)."""
        out = dataclasses.asdict(self)
        out["seeds"] = list(self.seeds)
        out["split"] = list(self.split)
        out["variants"] = list(self.variants)
        variants = load_variants()
        out["variant_definitions"] = {v: variants[v].definition() for v in self.variants}
        out["student_training"] = STUDENT  # student.yaml edited: the study's students train otherwise
        return out


ALL_VARIANTS = tuple(load_variants())

PROFILES: dict[str, Profile] = {
    # The README's main command: <= 15 minutes on 2 CPU cores from a fresh clone. Students distil on
    # a small training set; the test split is large (>= 1,000 items) so one question moves a type's
    # score by well under a point.
    "quick": Profile(
        name="quick",
        scenes=280,  # 993 train / 172 val / 1,024 test questions at seed 0
        split=(0.45, 0.08, 0.47),
        data_seed=0,
        student_epochs=2,
        student_lr=1e-3,
        seeds=(0,),
        variants=("ce", "multi-agp"),
        prestudy_samples=48,
        mechanism_samples=128,
        bench_repeats=3,
        bench_score=False,  # the students are scored by the study itself; the demo's time is kept for them
    ),
    # The main comparison, three seeds, with the baselines the paper compares attention against
    # (logit KL, hidden states) and the plain sum; a larger training set than quick's. About an
    # hour and a half on 2 CPU cores with two jobs (docs/results.md).
    "full": Profile(
        name="full",
        scenes=400,
        split=(0.55, 0.1, 0.35),
        data_seed=0,
        student_epochs=2,
        student_lr=1e-3,
        seeds=(0, 1, 2),
        variants=("ce", "ce-kl", "ce-hidden", "multi-sum", "multi-agp", "multi-agp-share0.02"),
        prestudy_samples=48,
        eval_batch_size=16,  # the generation batch its published figures were made with (docs/results.md)
        bench_repeats=3,
        bench_score=False,
    ),
    # Every variant (strategies, single-capability protocol, loss shares), three seeds, a larger
    # test split: several hours on 2 CPU cores.
    "ablations": Profile(
        name="ablations",
        scenes=700,
        split=(0.45, 0.1, 0.45),
        data_seed=0,
        student_epochs=2,
        student_lr=1e-3,
        seeds=(0, 1, 2),
        variants=ALL_VARIANTS,
        prestudy_samples=96,
        bench_repeats=5,
    ),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise DriveKDError(f"unknown profile {name!r} (choose from {', '.join(PROFILES)})")
    return PROFILES[name]
