"""A study's students as configs: each run is a `drivekd sft` / `drivekd distill` config file in its
run folder, made from student.yaml with the profile's, the variant's and the run's own settings laid
over it. The study runs that file, so `drivekd distill --config STUDY/runs/NAME/seed-N/config.yaml`
(with another `train.output_dir=`) trains the same student by hand.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from drivekd.atomic import atomic_file
from drivekd.data.sample import CAPABILITIES
from drivekd.errors import DriveKDError
from drivekd.study.profiles import STUDENT, STUDENT_FILE, VARIANTS, Profile, Variant
from drivekd.train.config import DistillConfig, SFTConfig, dump_config, load_config, validate_config
from drivekd.train.run_folder import RunFolder
from drivekd.yamlfile import merged, read_yaml

CONFIG = "config.yaml"


@dataclass(frozen=True)
class StudentRun:
    """One trained student: a variant at a seed, on all data or on one capability's split."""

    variant: Variant
    seed: int
    capability: str | None

    @property
    def key(self) -> str:
        return f"{self.variant.name}/seed-{self.seed}" + (f"/{self.capability}" if self.capability else "")

    @property
    def row(self) -> str:
        """The report's row: every capability's student of a per-capability variant at one seed."""
        return f"{self.variant.name}/seed-{self.seed}"


class StudentConfigs:
    """Where a study's students, recipes and teacher caches live, and each student's config."""

    def __init__(self, out: Path, profile: Profile, teacher: str, student: str) -> None:
        self.out, self.profile, self.teacher, self.student = out, profile, teacher, student
        self.data = out / "data"

    def runs(self, variant: str, seed: int) -> list[StudentRun]:
        v = VARIANTS[variant]
        return [StudentRun(v, seed, cap) for cap in (CAPABILITIES if v.per_capability else (None,))]

    def run_dir(self, run: StudentRun) -> Path:
        return self.out / "runs" / run.key

    def recipe_keys(self) -> list[tuple[str, str | None]]:
        """(recipe, capability) of every distilled student of the profile, once each."""
        keys = [
            (VARIANTS[name].recipe, run.capability)
            for name in self.profile.variants
            if VARIANTS[name].distills
            for run in self.runs(name, 0)
        ]
        return list(dict.fromkeys(keys))

    @staticmethod
    def key(recipe: str, capability: str | None) -> str:
        return recipe + (f"-{capability}" if capability else "")

    def cache_dir(self, recipe: str, capability: str | None) -> Path:
        return self.out / "caches" / self.key(recipe, capability)

    def source_recipe(self, recipe: str, capability: str | None) -> dict[str, dict[str, Any]]:
        """The recipe's signals as YAML data; `prestudy` is the pre-study's recommendation."""
        from drivekd.distill.recipe import RECIPES

        path = self.out / "prestudy" / "recipe.yaml" if recipe == "prestudy" else RECIPES / f"{recipe}.yaml"
        signals = read_yaml(path) or {}
        if capability is not None:
            if capability not in signals:
                raise DriveKDError(f"{path}: no {capability!r} signal for the single-capability protocol")
            signals = {capability: signals[capability]}
        return signals

    def recipe_file(self, recipe: str, capability: str | None, share: float | None) -> Path:
        """The recipe with every signal at `share` of the CE (each run measures the weights for it)."""
        share = self.profile.kd_share if share is None else share
        key = self.key(recipe, capability)
        path = self.out / "recipes" / f"{key}@{share:g}.yaml"
        signals = self.source_recipe(recipe, capability)
        body = {}
        for name, fields in signals.items():
            fields = {k: v for k, v in fields.items() if k not in ("weight", "share")}
            body[name] = {**fields, "share": share}
        text = f"# {key}: each signal's loss starts at {share:g} x the CE\n" + yaml.safe_dump(body, sort_keys=False)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            with atomic_file(path) as tmp:
                tmp.write_text(text, encoding="utf-8")
        return path

    def config(self, run: StudentRun) -> SFTConfig | DistillConfig:
        """The run's config, validated: student.yaml, then the profile's, the variant's and the run's
        settings over it."""
        p, v = self.profile, run.variant
        raw = merged(
            STUDENT,
            {
                "model": {"name": self.student, "seed": run.seed},
                "data": {"path": str(self.data), "capability": run.capability},
                "train": {
                    "output_dir": str(self.run_dir(run)),
                    "epochs": p.student_epochs,
                    "lr": p.student_lr,
                    "seed": run.seed,
                    "eval_every": None,
                },
            },
        )
        source = f"{STUDENT_FILE} with profile {p.name!r}, variant {v.name!r}"
        if not v.distills:
            return validate_config(SFTConfig, raw, source)
        distill = {
            "teacher": {"name": self.teacher, "cache": str(self.cache_dir(v.recipe, run.capability))},
            "recipe": str(self.recipe_file(v.recipe, run.capability, v.kd_share)),
            "mixing": v.mixing,
            "combine": {"strategy": v.strategy, "amortize_every": v.amortize_every},
        }
        return validate_config(DistillConfig, merged(raw, distill), source)

    def write(self, run: StudentRun) -> Path:
        """The run's config file, read back through the same loader as `drivekd sft` / `distill`."""
        path = self.run_dir(run) / CONFIG
        with atomic_file(path) as tmp:
            tmp.write_text(dump_config(self.config(run)), encoding="utf-8")
        load_config(DistillConfig if run.variant.distills else SFTConfig, path)  # what the run will read
        return path


def train(configs: StudentConfigs, run: StudentRun) -> None:
    """Train one student from its config file: started, resumed from its last checkpoint, or left
    alone when finished."""
    from drivekd.distill.run import run_distill
    from drivekd.train.sft import run_sft

    folder = RunFolder(configs.run_dir(run))
    if folder.path.is_dir() and not folder.has_checkpoint() and not folder.finished:
        shutil.rmtree(folder.path)  # killed before its first checkpoint: its old metrics would mix in
    resume = folder.has_checkpoint()
    path = configs.write(run)
    if run.variant.distills:
        run_distill(load_config(DistillConfig, path), resume=resume)
    else:
        run_sft(load_config(SFTConfig, path), resume=resume)
