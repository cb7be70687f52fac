"""Experiment configs: one YAML file validated into typed objects, every field overridable.

`drivekd sft --config c.yaml train.lr=1e-4 data.capability=planning` overrides nested keys; the
resolved config is written into the run directory.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from drivekd.domains import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    OpenFraction,
    PositiveFloat,
    PositiveInt,
)
from drivekd.errors import DriveKDError, closest
from drivekd.yamlfile import parse_value, read_yaml

Capability = Literal["perception", "reasoning", "planning"]


def _capability(value: Any) -> Any:
    """A capability alias (plan, prediction, ...) as its capability; anything else as it is, for the
    field's own check to refuse."""
    from drivekd.data.sample import capability_of

    return capability_of(value) or value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # dotted keys that left this config, each with where it went: a config that still gives one is
    # refused with that (by `load_config`), not as an unknown field
    moved: ClassVar[dict[str, str]] = {}


class ModelConfig(_Strict):
    """The model trained and how it is loaded."""

    name: str = Field(
        description="a preset (tiny-internvl-student, ...), a shipped model (drivesim-internvl-teacher, ...), "
        "a checkpoint folder or a hub id"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights' dtype once loaded")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "sdpa", description="attention kernel of the layers nothing captures"
    )
    freeze_vision: bool = Field(False, description="keep the vision tower's weights fixed")
    freeze_projector: bool = Field(False, description="keep the vision-to-language projector fixed")
    freeze_llm: bool = Field(False, description="keep the language model fixed")
    lora: dict[str, Any] | None = Field(
        None, description="peft LoraConfig fields (e.g. {r: 16, target_modules: [q_proj, v_proj]}); None: full"
    )
    seed: NonNegativeInt = Field(0, description="initialisation seed of presets")


class MixIn(_Strict):
    """Extra training data mixed into `data.path`'s train split."""

    path: str = Field(description="a native dataset folder (its train split) or a data file of any format")
    format: Literal["native", "reference", "drivebench", "drivelm"] | None = Field(
        None, description="the data format; None: detected"
    )
    samples: PositiveInt | None = Field(None, description="a seeded random subset of this many; None: all of them")
    seed: NonNegativeInt = Field(0, description="seed of that subset")


class DataConfig(_Strict):
    """The training and validation data."""

    path: str = Field(description="a dataset folder (train/val/test.jsonl) or a data file of any format")
    format: Literal["native", "reference", "drivebench", "drivelm"] | None = Field(
        None, description="native, reference, drivebench or drivelm; None: detected"
    )
    image_roots: list[str] = Field([], description="where images are found: DIR or PREFIX=DIR, in order")
    train_split: str = Field("train", description="the split trained on")
    val_split: str | None = Field("val", description="the split validated on; None: no validation")
    capability: Capability | None = Field(
        None,
        description="train on one capability's samples only (the single-capability protocol); aliases "
        "such as plan or prediction are accepted",
    )
    max_length: PositiveInt = Field(512, description="longest sample in tokens (prompt, images and answer)")
    on_overlong: Literal["error", "skip"] = Field(
        "error", description="a longer sample is an error, or skipped and counted; an answer is never cut"
    )
    limit: PositiveInt | None = Field(None, description="first N training samples only (smoke tests)")
    shuffle_choices: bool = Field(
        False,
        description="re-letter multiple-choice options every epoch, so letters are read from the options "
        "rather than memorised per question (training only; not with a teacher cache)",
    )
    mix: list[MixIn] = Field([], description="other training data added to path's train split; validation stays path's")

    @field_validator("capability", mode="before")
    @classmethod
    def _capability_alias(cls, value: Any) -> Any:
        return _capability(value)


class TrainConfig(_Strict):
    """The training loop: steps, batches, optimiser, validation, checkpoints."""

    output_dir: str = Field(description="run folder: checkpoints/, final/, metrics.jsonl, config.yaml")
    epochs: PositiveFloat = Field(1.0, description="passes over the training data (ignored when max_steps is set)")
    max_steps: PositiveInt | None = Field(None, description="optimiser steps; None: from epochs")
    micro_batch_size: PositiveInt = Field(8, description="samples per forward pass and process")
    grad_accum: PositiveInt = Field(1, description="micro-batches per optimiser step")
    group_by_length: bool = Field(False, description="batches of similar length (less padding), in shuffled order")
    loader_workers: NonNegativeInt = Field(
        0,
        description="processes building batches ahead of the training step (images, tokens); 0: in the loop. "
        "The batches are the same either way; on a GPU, several keep it from waiting for the CPU",
    )
    lr: PositiveFloat = Field(3e-4, description="peak learning rate (AdamW)")
    weight_decay: NonNegativeFloat = Field(0.0, description="AdamW weight decay")
    betas: tuple[OpenFraction, OpenFraction] = Field((0.9, 0.999), description="AdamW betas")
    warmup_steps: NonNegativeInt = Field(10, description="linear warm-up steps before the cosine decay")
    min_lr_ratio: Fraction = Field(0.0, description="the cosine decay's floor, as a fraction of lr")
    max_grad_norm: PositiveFloat | None = Field(1.0, description="gradient clipping; None: off")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="autocast on GPUs")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="how processes share the student: ddp (each holds the whole model, gradients averaged) or "
        "fsdp (FSDP2: each holds 1/N of the weights, gradients and optimiser state; sharded checkpoints). "
        "With sum, or AGP projected per step, the weights after N steps are the same either way, up to "
        "rounding; AGP projected per micro-batch projects each process's gradients under ddp and the global "
        "micro-batch's under fsdp",
    )
    activation_checkpointing: bool = Field(
        False,
        description="keep only each decoder layer's input (language model and vision tower) and run the layer "
        "again in the backward pass: the activations held drop to about one hidden state per layer, for about "
        "one more forward's time; the gradients are the same as without",
    )
    seed: NonNegativeInt = Field(0, description="data order, dropout and AGP's projection order")
    log_every: PositiveInt = Field(10, description="optimiser steps per metrics.jsonl line")
    eval_every: PositiveInt | None = Field(
        None, description="optimiser steps between validations; None: at the end only"
    )
    val_max_samples: PositiveInt = Field(256, description="validation samples used")
    val_other_images: bool = Field(
        False,
        description="also validate with every sample shown another scene's images: val_image_gain near 0 "
        "means the answers do not depend on the images",
    )
    save_every: PositiveInt | None = Field(
        None, description="optimiser steps between checkpoints; None: at the end only"
    )
    keep_last: PositiveInt = Field(2, description="checkpoints kept (at least the latest)")

    @model_validator(mode="after")
    def _sharding(self) -> TrainConfig:
        if self.distributed == "fsdp" and self.mixed_precision == "fp16":
            raise ValueError(
                "train.mixed_precision: fp16 with train.distributed: fsdp needs a sharded loss scaler drivekd does "
                "not have; use bf16"
            )
        return self


TAG_ATTENTION_MOVED = (
    "moved to an experimental SFT command: run `drivekd experimental sft-tag-attention --config {config}` "
    "with the section `tag_attention: {{weight, layer}}`"
)
TAG_ATTENTION_IS_SFT = (
    "is an SFT loss (now the experimental `drivekd experimental sft-tag-attention`); a distillation run has "
    "no tag-attention loss"
)


class SFTConfig(_Strict):
    """One supervised fine-tuning run."""

    moved: ClassVar[dict[str, str]] = {
        "train.tag_attention_weight": TAG_ATTENTION_MOVED,
        "train.tag_attention_layer": TAG_ATTENTION_MOVED,
    }

    model: ModelConfig
    data: DataConfig
    train: TrainConfig

    @model_validator(mode="after")
    def _consistent(self) -> SFTConfig:
        check_sharding(self.model, self.train)
        return self


def check_sharding(model: ModelConfig, train: TrainConfig) -> None:
    if train.distributed == "fsdp" and model.lora is not None:
        raise ValueError(
            "model.lora with train.distributed: fsdp: a sharded peft model is not saved or resumed by drivekd yet; "
            "use train.distributed: ddp (LoRA's trained parameters are few, so each process holding them is cheap)"
        )


C = TypeVar("C", bound=BaseModel)


def load_config(cls: type[C], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> C:
    path = Path(path)
    raw = read_yaml(path)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise DriveKDError(f"{path}: a config maps sections (model, data, train, ...) to their fields")
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
        node[parts[-1]] = parse_value(value)
    return validate_config(cls, raw, str(path), overrides)


def validate_config(cls: type[C], raw: Any, source: str, overrides: Sequence[str] = ()) -> C:
    """`raw` as a `cls` config, or a one-line error naming `source` (or the override that set the field):
    a moved field with where it went, an unknown one with the closest name, a value outside its domain."""
    expand = getattr(cls, "expand_shorthands", None)
    if expand is not None:
        raw = expand(raw)
    for key, where in getattr(cls, "moved", {}).items():
        if _holds(raw, key):
            given = [o for o in overrides if f"{o.split('=', 1)[0]}.".startswith(f"{key}.")]
            origin = f"override {given[-1]!r}" if given else source
            raise DriveKDError(f"{origin}: `{key}` {where.format(config=source)}")
    for key, hint in unknown_keys(cls, raw):
        given = [o for o in overrides if o.split("=", 1)[0] == key]
        origin = f"override {given[-1]!r}" if given else source
        raise DriveKDError(f"{origin}: unknown field `{key}`{hint}")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        err, loc, more = first_error(e)
        msg = err["msg"].removeprefix("Value error, ")
        # A field given on the command line is reported against the command line, not the file.
        # (a check across a section's fields names the section: an override inside it is the one meant)
        keys = [(o, o.split("=", 1)[0]) for o in overrides]
        given = [o for o, k in keys if k == loc or loc.startswith(k + ".") or (loc and k.startswith(loc + "."))]
        origin = f"override {given[-1]!r}" if given else source
        raise DriveKDError(f"{origin}: {loc + ': ' if loc else ''}{msg}{more}") from e


def _holds(raw: Any, key: str) -> bool:
    """Whether the raw config gives the dotted `key`."""
    for part in key.split("."):
        if not isinstance(raw, dict) or part not in raw:
            return False
        raw = raw[part]
    return True


def first_error(e: ValidationError) -> tuple[dict[str, Any], str, str]:
    """The error to show, its dotted field and a note on the others. Of a field that takes one of
    several forms (`mixing`: a name or a matrix), the deepest error is the one meant: a matrix entry,
    not "should be 'identity'"; the forms' own tags are left out of the field's name."""
    errors = e.errors()
    by_field: dict[Any, list[dict[str, Any]]] = {}
    for err in errors:
        by_field.setdefault(err["loc"][:1], []).append(err)
    err = max(next(iter(by_field.values())), key=lambda x: len(x["loc"]))
    loc = ".".join(str(x) for x in err["loc"] if not (isinstance(x, str) and ("[" in x or "(" in x)))
    others = len(errors) - len(next(iter(by_field.values())))
    return err, loc, f" (and {others} more)" if others else ""


def unknown_keys(cls: type[BaseModel], raw: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Each key of `raw` that is not a field of `cls` (sections walked), with a hint naming the closest
    field: a misspelt section or field is named, not reported as the missing one it was meant to be."""
    if not isinstance(raw, dict):
        return
    fields = cls.model_fields
    for key, value in raw.items():
        if key not in fields:
            close = closest(key, fields)
            hint = f" (did you mean `{prefix}{close}`?)" if close else f" ({prefix or 'fields'}: {', '.join(fields)})"
            yield f"{prefix}{key}", hint
            continue
        for inner in _models_in(fields[key].annotation):
            if isinstance(value, list):
                for i, item in enumerate(value):
                    yield from unknown_keys(inner, item, f"{prefix}{key}[{i}].")
            else:
                yield from unknown_keys(inner, value, f"{prefix}{key}.")


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config classes a field's annotation holds (itself, in a list or an optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


MEMORY = r"^\d+(\.\d+)?\s*([KMGT]i?B|B)$"  # a size as accelerate reads it: 500MiB, 70GiB, 1.5TB


class TeacherConfig(_Strict):
    name: str | None = Field(None, description="checkpoint of every signal (a shipped name, a folder or a hub id)")
    per_signal: dict[str, str] = Field(
        {}, description="a signal's own teacher, by signal name (multi-teacher: {planning: PATH, ...})"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="teachers' dtype once loaded")
    cache: str | None = Field(
        None, description="a `drivekd cache-teacher` folder: targets read from it, no teacher loaded"
    )
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | dict[str, NonNegativeInt | str] | None = (
        Field(
            None,
            description="spread each live teacher over devices, CPU memory and disk (a teacher larger than one "
            "device): accelerate's placement, or {module name: device}; None: on the student's device",
        )
    )
    max_memory: dict[NonNegativeInt | str, Annotated[str, Field(pattern=MEMORY)]] | None = Field(
        None, description='with device_map: the most each device may hold, e.g. {0: "70GiB", cpu: "200GiB"}'
    )
    offload_folder: str | None = Field(
        None, description="with device_map: where the weights that fit no device go (read back each forward)"
    )

    def of(self, signal: str) -> str | None:
        return self.per_signal.get(signal, self.name)

    def placement(self) -> dict[str, Any]:
        """How a live teacher is placed, as `LoadOptions` fields."""
        return {"device_map": self.device_map, "max_memory": self.max_memory, "offload_folder": self.offload_folder}

    @model_validator(mode="after")
    def _placement_needs_a_map(self) -> TeacherConfig:
        if self.device_map is None and (self.max_memory is not None or self.offload_folder is not None):
            raise ValueError("max_memory and offload_folder place a teacher spread by device_map: set it (e.g. auto)")
        return self


class CombineConfig(_Strict):
    strategy: Literal["sum", "pcgrad", "agp", "agp-stage1", "agp-stage2", "agp-normalized"] = Field(
        "agp",
        description="how the losses' gradients become one: sum, PCGrad, or Asymmetric Gradient Projection "
        "(both stages, one of them, or with normalised gradients)",
    )
    amortize_every: PositiveInt | None = Field(
        None, description="recompute the combination's coefficients every N optimiser steps (None: every step)"
    )
    project_per: Literal["micro_batch", "step"] = Field(
        "micro_batch", description="combine each micro-batch's gradients, or their sums once per optimiser step"
    )
    buffer_dtype: Literal["float32", "bfloat16"] | None = Field(
        None,
        description="dtype of the (losses x trainable parameters) task-gradient buffer (`gram: buffer`); None: "
        "the parameters' dtype. bfloat16 halves it for fp32 weights (Gram matrix and combination stay fp32)",
    )
    gram: Literal["buffer", "modules"] = Field(
        "buffer",
        description="where a projection strategy's Gram matrix comes from: buffer (each loss's gradient in a "
        "(losses x parameters) buffer) or modules (parameter taps and one batched backward of all losses, no "
        "per-loss gradient kept, then one backward of the weighted sum: no buffer, but slower on a CPU and k "
        "cotangents per activation; not with project_per: step or buffer_dtype)",
    )

    @model_validator(mode="after")
    def _gram_path_fits(self) -> CombineConfig:
        if self.gram == "modules" and self.project_per == "step":
            raise ValueError(
                "gram: modules cannot project per step (the Gram matrix of step-summed gradients needs their "
                "cross terms across micro-batches); use gram: buffer"
            )
        if self.gram == "modules" and self.buffer_dtype is not None:
            raise ValueError("buffer_dtype sizes the gram: buffer path's buffer; gram: modules keeps none")
        return self


class DistillConfig(_Strict):
    """Student, teachers, recipe, mixing and gradient combination of one distillation run."""

    moved: ClassVar[dict[str, str]] = {
        "reweight": "moved to an experimental command: run `drivekd experimental distill-reweight --config {config}`",
        "train.tag_attention_weight": TAG_ATTENTION_IS_SFT,
        "train.tag_attention_layer": TAG_ATTENTION_IS_SFT,
    }

    model: ModelConfig = Field(description="the student")
    data: DataConfig
    train: TrainConfig
    teacher: TeacherConfig = Field(
        TeacherConfig(), description="where the targets come from (a string is teacher.name)"
    )
    recipe: str = Field("drive-kd", description="a shipped recipe (drivekd/distill/recipes) or a YAML path")
    mixing: Literal["identity", "reference"] | list[list[NonNegativeFloat]] = Field(
        "reference",
        description="each signal's weight per sample capability: reference (0.8 own, 0.1 others), identity, "
        "or a 3 x signals matrix (rows perception, reasoning, planning)",
    )
    ce_weight: NonNegativeFloat = Field(1.0, description="weight of the cross-entropy anchor")
    calibration_batches: PositiveInt = Field(
        16,
        description="micro-batches' worth of training samples (a seeded random sample) on which each run "
        "measures its initial losses, to turn the recipe's loss shares into weights (calibration.json)",
    )
    combine: CombineConfig = Field(CombineConfig(), description="gradient combination")

    @staticmethod
    def expand_shorthands(raw: Any) -> Any:
        """`teacher: PATH` is `teacher: {name: PATH}` (applied before command-line overrides too, so
        `teacher.cache=DIR` works on either form)."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        if isinstance(raw.get("teacher"), str):
            raw["teacher"] = {"name": raw["teacher"]}
        return raw

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, raw: Any) -> Any:
        return cls.expand_shorthands(raw)

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        check_sharding(self.model, self.train)
        if self.train.mixed_precision == "fp16" and self.combine.strategy != "sum":
            raise ValueError(
                f"train.mixed_precision: fp16 with combine.strategy: {self.combine.strategy}: the per-loss gradients "
                "a projection strategy takes bypass the fp16 loss scaler, so every step's gradient would be divided "
                "by the loss scale; use bf16 (no scaler), or strategy sum"
            )
        if self.train.distributed == "fsdp" and self.combine.gram == "modules" and self.combine.strategy != "sum":
            raise ValueError(
                "combine.gram: modules with train.distributed: fsdp: the module taps need whole parameters; use "
                "gram: buffer (under FSDP its buffer holds each rank's shards only)"
            )
        if (
            self.train.activation_checkpointing
            and self.train.mixed_precision != "no"
            and self.combine.gram == "modules"
            and self.combine.strategy != "sum"
        ):
            # measured on CPU bf16: under torch.vmap autocast skips composite ops (F.linear, SDPA), so a
            # layer recomputed inside the batched pass would not compute what its first forward did
            raise ValueError(
                "train.activation_checkpointing with combine.gram: modules under train.mixed_precision: "
                f"{self.train.mixed_precision}: the Gram pass's batched backward recomputes the layers where "
                "autocast does not reach every op; use gram: buffer, or mixed_precision: no, or no checkpointing"
            )
        if self.train.val_other_images and self.teacher.cache:
            raise ValueError(
                f"train.val_other_images with teacher.cache {self.teacher.cache}: cached targets belong to each "
                "sample's own images (distil from the live teacher, or validate without the control)"
            )
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
        type_name = _type_name(annotation, info.metadata)
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


def _type_name(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """A field's type as users read it, with its domain (`int >= 1`, `float in [0, 1)`)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        inner = [m for a in args[1:] for m in (a.metadata if isinstance(a, FieldInfo) else [a])]
        return _type_name(args[0], [*inner, *metadata])
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    name = getattr(annotation, "__name__", str(annotation))
    bounds = {type(m).__name__: m for m in metadata if type(m).__name__ in ("Ge", "Gt", "Le", "Lt")}
    low = ("[", bounds["Ge"].ge) if "Ge" in bounds else ("(", bounds["Gt"].gt) if "Gt" in bounds else None
    high = ("]", bounds["Le"].le) if "Le" in bounds else (")", bounds["Lt"].lt) if "Lt" in bounds else None
    if low and high:
        return f"{name} in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low:
        return f"{name} {'>=' if low[0] == '[' else '>'} {low[1]:g}"
    if high:
        return f"{name} {'<=' if high[0] == ']' else '<'} {high[1]:g}"
    return name


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
