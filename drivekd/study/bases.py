"""Build the pretrained DriveSim bases (`drivekd reproduce --profile drivesim-internvl-teacher`).

A build is data (`bases.yaml`): the datasets it generates, the `drivekd sft` stages it runs in
order, and the held-out set its card is scored on. Like a study, it is resumable step by step: a
dataset is done when its folder has a card (or split files), a stage when its final model exists,
and a killed stage resumes from its last checkpoint. The last steps export the weights in the
shipped dtype, score the exported copy (own images, another scene's images, the majority baseline)
and write `card.json` beside them; `drivekd models install-base` copies the result into the package.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ConfigDict

from drivekd.atomic import atomic_dir, write_json
from drivekd.digest import sha256_of
from drivekd.domains import Fraction, NonNegativeInt
from drivekd.errors import DriveKDError
from drivekd.train.config import SFTConfig, validate_config
from drivekd.train.run_folder import RunFolder, Timings, claim_folder
from drivekd.yamlfile import merged, read_yaml

BASES_FILE = Path(__file__).with_name("bases.yaml")
# Scenes of seed S are built from (S, i): every seed in this range belongs to the bases, so a study or
# a test using one of them could score a base on scenes it was trained on.
BASE_SEEDS = range(100, 300)


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    task: str = "qa"
    scenes: NonNegativeInt = 0
    seed: NonNegativeInt = 0
    split: tuple[Fraction, Fraction, Fraction] = (0.8, 0.1, 0.1)
    drill: str | None = None  # option-lookup items of this dataset instead of generating


@dataclass(frozen=True)
class BaseBuild:
    name: str
    preset: str
    about: str
    datasets: dict[str, DatasetSpec]
    stages: dict[str, dict[str, Any]]
    evaluate: str
    check: str
    export_dtype: str = "float16"
    variant: str | None = None  # e.g. "gpu": the spec's `variants.gpu` laid over it
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def rebuild_command(self) -> str:
        variant = f" --variant {self.variant}" if self.variant else ""
        return f"drivekd reproduce --profile {self.name}{variant} --out DIR"

    @property
    def trained_seeds(self) -> list[int]:
        """Seeds whose scenes (any split) the build trains on or scores with."""
        return sorted({d.seed for d in self.datasets.values() if d.drill is None})


def load_builds(path: Path = BASES_FILE, variant: str | None = None) -> dict[str, BaseBuild]:
    """The builds of a bases file; with `variant`, each build's spec with that variant merged in
    (a build without that variant is left out)."""
    raw = read_yaml(path) or {}
    builds = {}
    for name, spec in raw.items():
        variants = spec.pop("variants", None) or {}
        if variant is not None:
            if variant not in variants:
                continue
            spec = {**merged(spec, variants[variant]), "variant": variant}
        builds[name] = _parse_build(name, spec, path)
    if variant is not None and not builds:
        raise DriveKDError(f"{path}: no build has a variant {variant!r}")
    return builds


def _parse_build(name: str, spec: dict[str, Any], path: Path) -> BaseBuild:
    datasets = {}
    for dname, d in spec["datasets"].items():
        datasets[dname] = validate_config(DatasetSpec, {"name": dname, **d}, f"{path}: {name}: dataset {dname}")
    for dname, d in datasets.items():
        if d.drill is not None and d.drill not in datasets:
            raise DriveKDError(f"{path}: {name}: dataset {dname!r} drills unknown dataset {d.drill!r}")
        if d.drill is None and d.seed not in BASE_SEEDS:
            raise DriveKDError(f"{path}: {name}: dataset {dname!r}: seed {d.seed} is outside {BASE_SEEDS}")
    both = sorted(set(datasets) & set(spec["stages"]))
    if both:
        raise DriveKDError(
            f"{path}: {name}: {both[0]!r} names both a dataset and a stage, so '@{both[0]}' is ambiguous"
        )
    for stage, raw in spec["stages"].items():  # every stage checked before any dataset is generated
        checked = merged(raw, {"train": {"output_dir": "(the build's stage folder)"}})
        validate_config(stage_config_class(raw), checked, f"{path}: {name}: stage {stage}")
    return BaseBuild(
        name=name,
        preset=spec["preset"],
        about=" ".join(spec["about"].split()),
        datasets=datasets,
        stages=spec["stages"],
        evaluate=spec["evaluate"],
        check=spec["check"],
        export_dtype=spec.get("export_dtype", "float16"),
        variant=spec.get("variant"),
        raw=spec,
    )


def stage_config_class(raw: dict[str, Any]) -> type[SFTConfig]:
    """SFT, or SFT with the experimental tag-attention loss where the stage has that section."""
    from drivekd.experimental.config import TagAttentionSFTConfig

    return TagAttentionSFTConfig if "tag_attention" in raw else SFTConfig


class BaseBuilder:
    def __init__(
        self,
        build: BaseBuild,
        out: Path,
        *,
        workers: int = 2,
        data_from: Path | None = None,
        echo: Callable[[str], None] = click.echo,
    ):
        self.build = build
        self.out = out
        self.workers = workers
        self.data_from = data_from  # a folder of DriveSim-QA datasets generated earlier (reused when equal)
        self.echo = echo

    def claim(self) -> None:
        claim_folder(self.out, "build.json", {"name": self.build.name, "spec": self.build.raw}, "build")

    def timed(self, step: str, fn: Callable[[], Any]) -> Any:
        return Timings(self.out).timed(step, fn, self.echo, f"build {self.build.name}")

    def dataset_dir(self, name: str) -> Path:
        return self.out / "data" / name

    def stage_dir(self, name: str) -> Path:
        return self.out / "stages" / name

    @property
    def export_dir(self) -> Path:
        return self.out / "export" / self.build.name

    # ---- steps -------------------------------------------------------------------------------
    def run(self, *, data_only: bool = False) -> Path:
        """Every step not done yet; `data_only`: the datasets only (e.g. before a GPU machine, which
        has no simulator, trains on them). Returns the export folder (the data folder with `data_only`)."""
        self.claim()
        # generated datasets first: a drill reads the dataset it drills
        for name, spec in sorted(self.build.datasets.items(), key=lambda item: item[1].drill is not None):
            if not _dataset_done(self.dataset_dir(name)):
                self.timed(f"data {name}", lambda spec=spec: self.make_dataset(spec))
        if data_only:
            return self.out / "data"
        stages = list(self.build.stages)
        for i, name in enumerate(stages, 1):
            if not RunFolder(self.stage_dir(name)).finished:
                self.echo(f"[build {self.build.name}] stage {i}/{len(stages)}: {name}")
                self.timed(f"stage {name}", lambda name=name: self.run_stage(name))
        if not (self.export_dir / "model.safetensors").is_file():
            self.timed("export", self.export)
        scores = self.out / "scores.json"
        if not scores.is_file():
            self.timed("evaluate", self.evaluate)
        self.write_card()
        self.echo(f"[build {self.build.name}] done: {self.export_dir}")
        return self.export_dir

    def make_dataset(self, spec: DatasetSpec) -> None:
        target = self.dataset_dir(spec.name)
        if spec.drill is not None:
            from drivekd.data.drill import option_lookup
            from drivekd.data.formats import load_split, write_jsonl

            source = self.dataset_dir(spec.drill)
            with atomic_dir(target, overwrite=True) as tmp:
                for split in ("train", "val", "test"):
                    write_jsonl(option_lookup(load_split(source, split)), tmp / f"{split}.jsonl")
            return
        from drivekd.data.drivesim.generate import GenerateConfig, generate

        config = GenerateConfig(scenes=spec.scenes, seed=spec.seed, task=spec.task, split_fractions=spec.split)
        earlier = find_dataset(self.data_from, config) if self.data_from is not None else None
        if earlier is not None:
            self.echo(f"[build {self.build.name}] data {spec.name}: the same dataset is in {earlier}; copied")
            with atomic_dir(target, overwrite=True) as tmp:
                shutil.copytree(earlier, tmp, dirs_exist_ok=True)
            return
        generate(target, config, workers=self.workers, overwrite=True)

    def stage_config(self, name: str) -> Any:
        """The stage's SFT config, its `@` references resolved to folders."""
        raw = json.loads(json.dumps(self.build.stages[name]))  # a deep copy
        raw.setdefault("train", {})["output_dir"] = str(self.stage_dir(name))
        return stage_config_class(raw).model_validate(self._resolve(raw, name))

    def _resolve(self, value: Any, stage: str) -> Any:
        if isinstance(value, dict):
            return {k: self._resolve(v, stage) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve(v, stage) for v in value]
        if isinstance(value, str) and value.startswith("@"):
            ref = value[1:]
            if ref in self.build.datasets:
                return str(self.dataset_dir(ref))
            order = list(self.build.stages)
            if ref in order and order.index(ref) < order.index(stage):
                return str(self.stage_dir(ref) / "final")
            raise DriveKDError(
                f"{BASES_FILE}: {self.build.name}: stage {stage}: {value} is no dataset or earlier stage"
            )
        return value

    def run_stage(self, name: str) -> None:
        from drivekd.experimental.config import TagAttentionSFTConfig
        from drivekd.experimental.tag_attention import run_sft_tag_attention
        from drivekd.train.sft import run_sft

        config = self.stage_config(name)
        run = run_sft_tag_attention if isinstance(config, TagAttentionSFTConfig) else run_sft
        run(config, resume=RunFolder(self.stage_dir(name)).has_checkpoint())

    def export(self) -> None:
        from drivekd.models.loading import LoadOptions, load_backend

        last = self.stage_dir(list(self.build.stages)[-1]) / "final"
        backend = load_backend(str(last), LoadOptions(dtype=self.build.export_dtype))
        with atomic_dir(self.export_dir, overwrite=True) as tmp:
            backend.save(tmp)

    def evaluate(self) -> None:
        from drivekd.data.formats import load_split
        from drivekd.data.sample import image_blind_control
        from drivekd.eval.baselines import majority_records
        from drivekd.eval.predict import predict, write_records
        from drivekd.eval.scoring import score_file
        from drivekd.models.loading import LoadOptions, load_backend

        data = self.dataset_dir(self.build.evaluate)
        test = load_split(data, "test")
        preds = self.out / "predictions"
        preds.mkdir(exist_ok=True)
        files = {
            "majority": preds / "majority.jsonl",
            "model": preds / "model.jsonl",
            "other_images": preds / "other-images.jsonl",
        }
        if not files["majority"].is_file():
            write_records(majority_records(load_split(data, "train"), test), files["majority"])
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        backend = load_backend(str(self.export_dir), LoadOptions(dtype="float32", device=device))
        throughput = {}
        # other scenes' images from the training split too, if the test split has too few scenes
        other, kept_own = image_blind_control(test, source=f"{data} (test)", pool=[*test, *load_split(data, "train")])
        if kept_own:
            print(f"warning: {kept_own} test samples have no other scene and keep their own images", file=sys.stderr)
        for key, samples in (("model", test), ("other_images", other)):
            if not files[key].is_file():
                throughput[key] = predict(backend, samples, files[key])
        check = check_score(backend, self.dataset_dir(self.build.check), preds / "check.jsonl")
        write_json(
            self.out / "scores.json",
            {
                "items": len(test),
                "throughput": throughput,
                "check": check,
                **{k: score_file(f) for k, f in files.items()},
            },
        )

    def write_card(self) -> None:
        import torch
        import transformers

        scores = json.loads((self.out / "scores.json").read_text(encoding="utf-8"))
        heldout = self.build.datasets[self.build.evaluate]
        card = {
            "name": self.build.name,
            "about": self.build.about,
            "preset": self.build.preset,
            "dtype": self.build.export_dtype,
            "weights_sha256": sha256_of(self.export_dir / "model.safetensors"),
            "rebuild": self.build.rebuild_command,
            "variant": self.build.variant,
            "generator": _generator_version(self.dataset_dir(self.build.evaluate)),
            "seeds": self.build.trained_seeds,
            "datasets": self.build.raw["datasets"],
            "stages": self.build.stages,
            "steps": sum(self.stage_config(s).train.max_steps or 0 for s in self.build.stages),
            "seconds": Timings(self.out).totals(),
            "machine": f"{platform.machine()}, {_cpu_count()} CPU threads"
            + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
            + f", torch {torch.__version__}, transformers {transformers.__version__}",
            "built": time.strftime("%Y-%m-%d"),
            "heldout": {
                "dataset": self.build.evaluate,
                "seed": heldout.seed,
                "scenes": heldout.scenes,
                "split": "test",
                "items": scores["items"],
            },
            "scores": {key: _summary(scores[key]) for key in ("model", "other_images", "majority")},
            "check": {"dataset": self.build.raw["datasets"][self.build.check], **scores["check"]},
        }
        write_json(self.export_dir / "card.json", card)


def find_dataset(root: Path, config: Any) -> Path | None:
    """A DriveSim-QA dataset under `root` generated with `config` by this generator version (so its
    bytes are the ones `generate` would write now), or None."""
    from dataclasses import asdict

    from drivekd.data.drivesim.generate import GENERATOR_VERSION

    wanted = json.loads(json.dumps(asdict(config)))  # tuples as lists, like the card
    for card_file in sorted(root.rglob("card.json")):
        try:
            card = json.loads(card_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if card.get("generator_version") == GENERATOR_VERSION and card.get("config") == wanted:
            if all((card_file.parent / f"{split}.jsonl").is_file() for split in ("train", "val", "test")):
                return card_file.parent
    return None


def check_score(backend: Any, data: Path, out: Path) -> dict[str, Any]:
    """Avg on the check dataset's test split: what the shipped-weights test recomputes."""
    from drivekd.data.formats import load_split
    from drivekd.eval.predict import predict
    from drivekd.eval.scoring import score_file

    samples = load_split(data, "test")
    predict(backend, samples, out)
    return {"items": len(samples), "Avg": score_file(out)["average"]}


def _summary(score: dict[str, Any]) -> dict[str, Any]:
    """The card's per-capability and per-type view of a `score_file` result."""
    return {
        "Avg": score["average"],
        **score["capabilities"],
        "types": {t: v["score"] for t, v in score["by_question_type"].items()},
        "top_letter_share": (score.get("letters") or {}).get("top_letter_share"),
    }


def _generator_version(data: Path) -> str | None:
    card = data / "card.json"
    return json.loads(card.read_text(encoding="utf-8")).get("generator_version") if card.is_file() else None


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _dataset_done(path: Path) -> bool:
    return (path / "card.json").is_file() or (path / "train.jsonl").is_file()


def verify(export_dir: Path, data_from: Path | None, work: Path, tolerance: float) -> dict[str, Any]:
    """Rescore a build's export on this machine (e.g. weights built on a GPU, checked on the CPU
    before they ship): the held-out test with the model's own images and the check set, against the
    card. Datasets come from `data_from` when it holds them, else they are generated into `work`."""
    from drivekd.data.drivesim.generate import GenerateConfig, generate
    from drivekd.data.formats import load_split
    from drivekd.eval.predict import predict
    from drivekd.eval.scoring import score_file
    from drivekd.models.loading import LoadOptions, load_backend

    for name in ("card.json", "model.safetensors"):
        if not (export_dir / name).is_file():
            raise DriveKDError(f"{export_dir}: no {name}: not a finished base build's export")
    card = json.loads((export_dir / "card.json").read_text(encoding="utf-8"))
    if sha256_of(export_dir / "model.safetensors") != card["weights_sha256"]:
        raise DriveKDError(f"{export_dir}: model.safetensors does not match its card's hash")

    def dataset(spec: dict[str, Any]) -> Path:
        spec = dict(spec)
        split = tuple(spec.pop("split", (0.8, 0.1, 0.1)))
        config = GenerateConfig(scenes=spec["scenes"], seed=spec["seed"], task=spec["task"], split_fractions=split)
        found = find_dataset(data_from, config) if data_from is not None else None
        if found is None:
            found = work / "data" / f"{spec['task']}-{spec['seed']}-{spec['scenes']}"
            if not _dataset_done(found):
                generate(found, config, overwrite=True)
        return found

    backend = load_backend(str(export_dir), LoadOptions(dtype="float32"))
    work.mkdir(parents=True, exist_ok=True)
    heldout = load_split(dataset(card["datasets"][card["heldout"]["dataset"]]), "test")
    predict(backend, heldout, work / "heldout.jsonl")
    here = {"heldout": score_file(work / "heldout.jsonl")["average"]}
    here["check"] = check_score(backend, dataset(card["check"]["dataset"]), work / "check.jsonl")["Avg"]  # its spec
    on_card = {"heldout": card["scores"]["model"]["Avg"], "check": card["check"]["Avg"]}
    result = {
        "name": card["name"],
        "built_on": card["machine"],
        "card": on_card,
        "here": here,
        "within_tolerance": all(abs(here[k] - on_card[k]) <= tolerance for k in here),
    }
    write_json(work / "verify.json", result)
    return result


def install(export_dir: Path, target_root: Path) -> Path:
    """Copy a finished build's export (weights, tokenizer, processor, card) into the package."""
    card = json.loads((export_dir / "card.json").read_text(encoding="utf-8"))
    if sha256_of(export_dir / "model.safetensors") != card["weights_sha256"]:
        raise DriveKDError(f"{export_dir}: model.safetensors does not match its card's hash")
    target = target_root / card["name"]
    with atomic_dir(target, overwrite=True) as tmp:
        for f in export_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    return target
