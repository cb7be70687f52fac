"""Experiment configs: one YAML file validated into typed objects, every field overridable.

`drivekd sft --config c.yaml train.lr=1e-4 data.capability=planning` overrides nested keys; the
resolved config is written into the run directory.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivekd.errors import DriveKDError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Strict):
    """The model trained and how it is loaded."""

    name: str = Field(
        description="a preset (tiny-internvl-student, ...), a shipped model (drivesim-internvl-teacher, ...), "
        "a checkpoint folder or a hub id"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights' dtype once loaded")
    attn_implementation: str = Field("sdpa", description="attention kernel of the layers nothing captures")
    freeze_vision: bool = Field(False, description="keep the vision tower's weights fixed")
    freeze_projector: bool = Field(False, description="keep the vision-to-language projector fixed")
    freeze_llm: bool = Field(False, description="keep the language model fixed")
    lora: dict[str, Any] | None = Field(
        None, description="peft LoraConfig fields (e.g. {r: 16, target_modules: [q_proj, v_proj]}); None: full"
    )
    seed: int = Field(0, description="initialisation seed of presets")


class MixIn(_Strict):
    """Extra training data mixed into `data.path`'s train split."""

    path: str = Field(description="a native dataset folder (its train split) or a data file of any format")
    format: str | None = Field(None, description="the data format; None: detected")
    samples: int | None = Field(None, description="a seeded random subset of this many; None: all of them")
    seed: int = Field(0, description="seed of that subset")


class DataConfig(_Strict):
    """The training and validation data."""

    path: str = Field(description="a dataset folder (train/val/test.jsonl) or a data file of any format")
    format: str | None = Field(None, description="native, reference, drivebench or drivelm; None: detected")
    image_roots: list[str] = Field([], description="where images are found: DIR or PREFIX=DIR, in order")
    train_split: str = Field("train", description="the split trained on")
    val_split: str | None = Field("val", description="the split validated on; None: no validation")
    capability: Literal["perception", "reasoning", "planning"] | None = Field(
        None, description="train on one capability's samples only (the single-capability protocol)"
    )
    max_length: int = Field(512, description="longest sample in tokens (prompt, images and answer)")
    on_overlong: Literal["error", "skip"] = Field(
        "error", description="a longer sample is an error, or skipped and counted; an answer is never cut"
    )
    limit: int | None = Field(None, description="first N training samples only (smoke tests)")
    shuffle_choices: bool = Field(
        False,
        description="re-letter multiple-choice options every epoch, so letters are read from the options "
        "rather than memorised per question (training only; not with a teacher cache)",
    )
    mix: list[MixIn] = Field([], description="other training data added to path's train split; validation stays path's")


class TrainConfig(_Strict):
    """The training loop: steps, batches, optimiser, validation, checkpoints."""

    output_dir: str = Field(description="run folder: checkpoints/, final/, metrics.jsonl, config.yaml")
    epochs: float = Field(1.0, description="passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, description="optimiser steps; None: from epochs")
    micro_batch_size: int = Field(8, description="samples per forward pass and process")
    grad_accum: int = Field(1, description="micro-batches per optimiser step")
    group_by_length: bool = Field(False, description="batches of similar length (less padding), in shuffled order")
    loader_workers: int = Field(
        0,
        ge=0,
        description="processes building batches ahead of the training step (images, tokens); 0: in the loop. "
        "The batches are the same either way; on a GPU, several keep it from waiting for the CPU",
    )
    tag_attention_weight: float = Field(
        0.0,
        description="SFT only: weight of a loss pulling one head's attention from the answer onto the "
        "visual token under the object the sample is about (teaches a model from scratch where to look)",
    )
    tag_attention_layer: int | None = Field(
        None, description="the LM layer tag attention supervises (negative from the end); None: the middle one"
    )
    lr: float = Field(3e-4, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_steps: int = Field(10, description="linear warm-up steps before the cosine decay")
    min_lr_ratio: float = Field(0.0, description="the cosine decay's floor, as a fraction of lr")
    max_grad_norm: float | None = Field(1.0, description="gradient clipping; None: off")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="autocast on GPUs")
    seed: int = Field(0, description="data order, dropout and AGP's projection order")
    log_every: int = Field(10, description="optimiser steps per metrics.jsonl line")
    eval_every: int | None = Field(None, description="optimiser steps between validations; None: at the end only")
    val_max_samples: int = Field(256, description="validation samples used")
    val_other_images: bool = Field(
        False,
        description="also validate with every sample shown another scene's images: val_image_gain near 0 "
        "means the answers do not depend on the images",
    )
    save_every: int | None = Field(None, description="optimiser steps between checkpoints; None: at the end only")
    keep_last: int = Field(2, description="checkpoints kept")


class SFTConfig(_Strict):
    """One supervised fine-tuning run."""

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
    expand = getattr(cls, "expand_shorthands", None)
    for item in overrides:
        if expand is not None:
            raw = expand(raw)
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
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        # A field given on the command line is reported against the command line, not the file.
        given = [o for o in overrides if o.split("=", 1)[0] == loc or loc.startswith(o.split("=", 1)[0] + ".")]
        source = f"override {given[-1]!r}" if given else str(path)
        raise DriveKDError(f"{source}: {loc + ': ' if loc else ''}{msg}{more}") from e


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


class TeacherConfig(_Strict):
    name: str | None = Field(None, description="checkpoint of every signal (a shipped name, a folder or a hub id)")
    per_signal: dict[str, str] = Field(
        {}, description="a signal's own teacher, by signal name (multi-teacher: {planning: PATH, ...})"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="teachers' dtype once loaded")
    cache: str | None = Field(
        None, description="a `drivekd cache-teacher` folder: targets read from it, no teacher loaded"
    )

    def of(self, signal: str) -> str | None:
        return self.per_signal.get(signal, self.name)


class CombineConfig(_Strict):
    strategy: Literal["sum", "pcgrad", "agp", "agp-stage1", "agp-stage2", "agp-normalized"] = Field(
        "agp",
        description="how the losses' gradients become one: sum, PCGrad, or Asymmetric Gradient Projection "
        "(both stages, one of them, or with normalised gradients)",
    )
    amortize_every: int | None = Field(
        None, description="recompute the combination's coefficients every N optimiser steps (None: every step)"
    )
    project_per: Literal["micro_batch", "step"] = Field(
        "micro_batch", description="combine each micro-batch's gradients, or their sums once per optimiser step"
    )
    buffer_dtype: Literal["float32", "bfloat16"] | None = Field(
        None,
        description="dtype of the (losses x trainable parameters) task-gradient buffer; None: the "
        "parameters' dtype. bfloat16 halves it for fp32 weights (Gram matrix and combination stay fp32)",
    )


class ReweightConfig(_Strict):
    enabled: bool = Field(False, description="online loss reweighting from gradient norms (docs/method.md §4)")
    lr: float = Field(3e-4, description="learning rate of the loss weights")
    alpha: float = Field(0.0, description="restoring-force exponent of the reweighting")
    ce_floor: float = Field(0.6, description="the cross-entropy weight's lower bound")


# Fields that moved into a section: a config using the old place gets told where they went.
_MOVED = {
    "teachers": "teacher.per_signal",
    "teacher_dtype": "teacher.dtype",
    "cache": "teacher.cache",
    "strategy": "combine.strategy",
    "amortize_every": "combine.amortize_every",
    "project_per": "combine.project_per",
    "reweight_lr": "reweight.lr",
    "reweight_alpha": "reweight.alpha",
    "ce_floor": "reweight.ce_floor",
}


class DistillConfig(_Strict):
    """Student, teachers, recipe, mixing and gradient combination of one distillation run."""

    model: ModelConfig = Field(description="the student")
    data: DataConfig
    train: TrainConfig
    teacher: TeacherConfig = Field(
        TeacherConfig(), description="where the targets come from (a string is teacher.name)"
    )
    recipe: str = Field("drive-kd", description="a shipped recipe (drivekd/distill/recipes) or a YAML path")
    mixing: Literal["identity", "reference"] | list[list[float]] = Field(
        "reference",
        description="each signal's weight per sample capability: reference (0.8 own, 0.1 others), identity, "
        "or a 3 x signals matrix (rows perception, reasoning, planning)",
    )
    ce_weight: float = Field(1.0, description="weight of the cross-entropy anchor")
    combine: CombineConfig = Field(CombineConfig(), description="gradient combination")
    reweight: ReweightConfig = Field(ReweightConfig(), description="online loss reweighting (true: enabled)")

    @staticmethod
    def expand_shorthands(raw: Any) -> Any:
        """`teacher: PATH` is `teacher: {name: PATH}`, `reweight: true` is `reweight: {enabled: true}`
        (applied before command-line overrides too, so `teacher.cache=DIR` works on either form)."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        if isinstance(raw.get("teacher"), str):
            raw["teacher"] = {"name": raw["teacher"]}
        if isinstance(raw.get("reweight"), bool):
            raw["reweight"] = {"enabled": raw["reweight"]}
        return raw

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for old, new in _MOVED.items():
                if old in raw:
                    raise ValueError(f"`{old}` is now `{new}`")
        return cls.expand_shorthands(raw)

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        if self.reweight.enabled and self.combine.strategy == "sum":
            raise ValueError("reweight needs per-loss gradient norms: use a projection strategy (e.g. agp), not sum")
        if self.combine.amortize_every is not None and self.combine.amortize_every < 1:
            raise ValueError("combine.amortize_every must be at least 1")
        if self.data.shuffle_choices and self.teacher.cache:
            raise ValueError(
                f"data.shuffle_choices with teacher.cache {self.teacher.cache}: cached teacher maps belong to the "
                "original option order (drop the cache to distil from the live teacher, or turn shuffling off)"
            )
        return self


CONFIGS: dict[str, type[BaseModel]] = {"sft": SFTConfig, "distill": DistillConfig}


def describe(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted field, type, default, description) of every field, sections expanded in place."""
    rows = []
    for name, info in cls.model_fields.items():
        key = f"{prefix}{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.append((key, "section", "", info.description or (annotation.__doc__ or "").strip().rstrip(".")))
            rows.extend(describe(annotation, f"{key}."))
            continue
        type_name = _type_name(annotation)
        if info.is_required():
            default = "required"
        elif isinstance(info.default, BaseModel):
            default = ""
        else:
            default = json.dumps(info.default)
        rows.append((key, type_name, default, info.description or ""))
        inner = typing.get_args(annotation)
        if typing.get_origin(annotation) is list and inner and isinstance(inner[0], type):
            if issubclass(inner[0], BaseModel):
                rows.extend(describe(inner[0], f"{key}[]."))
    return rows


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def reference(cls: type[BaseModel]) -> str:
    """The fields as text for `--help` and `drivekd config show` (click keeps `\\b` blocks as they are)."""
    lines = ["\b", "Config fields (override any as KEY=VALUE, e.g. train.lr=1e-4):"]
    for key, type_name, default, description in describe(cls):
        if type_name == "section":
            lines.append(f"  {key}: {description}")
            continue
        head = f"  {key} = {default}" if default else f"  {key}"
        lines.append(f"{head}  [{type_name}]  {description}")
    return "\n".join(lines)
