"""Experiment configs: one YAML file validated into typed objects, every field overridable.

`drivekd sft --config c.yaml train.lr=1e-4 data.capability=planning` overrides nested keys; the
resolved config is written into the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from drivekd.errors import DriveKDError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Strict):
    name: str  # a preset (tiny-internvl-teacher, ...), a checkpoint directory or a hub id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str = "sdpa"
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_llm: bool = False
    lora: dict[str, Any] | None = None
    seed: int = 0  # initialisation seed of presets


class MixIn(_Strict):
    """Extra training data mixed into `data.path`'s train split (e.g. grounding items kept in QA SFT)."""

    path: str  # a native dataset folder (its train split) or a data file of any format
    format: str | None = None
    samples: int | None = None  # a seeded random subset of this many; None: all of them
    seed: int = 0


class DataConfig(_Strict):
    path: str
    format: str | None = None
    image_roots: list[str] = []
    train_split: str = "train"
    val_split: str | None = "val"
    capability: Literal["perception", "reasoning", "planning"] | None = None  # single-capability protocol
    max_length: int = 512
    on_overlong: Literal["error", "skip"] = "error"  # an answer is never silently cut
    limit: int | None = None  # first N training samples (smoke tests)
    # Re-letter multiple-choice options per epoch (training only), so letters must be read from the
    # options rather than memorised per question.
    shuffle_choices: bool = False
    # Training only: validation stays `path`'s val split, so curves remain comparable with and without.
    mix: list[MixIn] = []


class TrainConfig(_Strict):
    output_dir: str
    epochs: float = 1.0
    max_steps: int | None = None
    micro_batch_size: int = 8
    grad_accum: int = 1
    group_by_length: bool = False  # batches of similar length (less padding), in shuffled order
    decision_weight: float = 1.0  # SFT: loss weight of answer tokens inside `Final: {...}` vs the rest
    # SFT: weight of the tag-attention loss (answer positions attend to the tagged object's visual
    # token; `sft.with_tag_attention`) and the LM layer it supervises (None: the middle one).
    tag_attention_weight: float = 0.0
    tag_attention_layer: int | None = None
    lr: float = 3e-4
    lr_scale: dict[Literal["vision", "projector", "llm"], float] = {}  # e.g. {vision: 5}: per-part lr multipliers
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None
    val_max_samples: int = 256
    # Also score validation with every sample shown another scene's images: `val_image_gain` (CE with
    # other images minus CE with its own) near 0 means the model does not read the images.
    val_other_images: bool = False
    save_every: int | None = None
    keep_last: int = 2


class SFTConfig(_Strict):
    model: ModelConfig
    data: DataConfig
    train: TrainConfig


C = TypeVar("C", bound=BaseModel)


def load_config(cls: type[C], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> C:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise DriveKDError(f"{path}: cannot read config: {e.strerror}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise DriveKDError(f"{path}{where}: malformed YAML: {getattr(e, 'problem', e)}") from e
    for item in overrides:
        if "=" not in item:
            raise DriveKDError(f"override {item!r} is not KEY=VALUE (e.g. train.lr=1e-4)")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DriveKDError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        # A field given on the command line is reported against the command line, not the file.
        given = [o for o in overrides if o.split("=", 1)[0] == loc or loc.startswith(o.split("=", 1)[0] + ".")]
        source = f"override {given[-1]!r}" if given else str(path)
        raise DriveKDError(f"{source}: {loc}: {err['msg']}{more}") from e


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


class DistillConfig(_Strict):
    """Student, teachers, recipe, mixing and gradient strategy of one distillation run."""

    model: ModelConfig  # the student
    data: DataConfig
    train: TrainConfig
    teacher: str | None = None  # default checkpoint of every signal
    teachers: dict[str, str] = {}  # per-signal checkpoint overrides (multi-teacher)
    recipe: str = "drive-kd"  # a shipped recipe name (drivekd/distill/recipes) or a YAML path
    mixing: Literal["identity", "reference"] | list[list[float]] = "reference"
    ce_weight: float = 1.0
    strategy: Literal["sum", "pcgrad", "agp", "agp-stage1", "agp-stage2", "agp-normalized"] = "agp"
    amortize_every: int | None = None  # recompute AGP coefficients every N optimiser steps
    reweight: bool = False  # online loss reweighting (method doc §4); needs a projection strategy
    reweight_lr: float = 3e-4
    reweight_alpha: float = 0.0
    ce_floor: float = 0.6
    project_per: Literal["micro_batch", "step"] = (
        "micro_batch"  # combine each micro-batch's gradients, or their sums per step
    )
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    cache: str | None = None  # teacher target cache folder (drivekd cache-teacher)
