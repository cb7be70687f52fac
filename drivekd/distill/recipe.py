"""Recipes: a YAML file of named signals, read into `Signal` objects and checked against the models
a distillation config names, before any model, data or output folder is touched; and the mixing
matrix that weighs each signal on each sample by its capability.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drivekd.data.sample import CAPABILITIES, capability_of
from drivekd.distill.signals import Signal, make_signal
from drivekd.domains import LayerIndex, PositiveFloat
from drivekd.errors import DriveKDError, closest
from drivekd.train.config import DistillConfig, first_error
from drivekd.yamlfile import read_yaml

ANCHOR = "ce"  # the cross-entropy's name among the losses; no signal may take it


class SignalSpec(BaseModel):
    """One recipe entry as written: every field typed and with its domain, unknown fields refused."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["attn_tv", "attn_full", "attn_group", "hidden", "logit_kl"] = Field(
        description="what is distilled: text->vision block, whole maps (attn_full and attn_group are one "
        "signal: a layer or a range, group-matched), hidden states, logits"
    )
    capability: Literal["perception", "reasoning", "planning", "all"] | None = Field(
        None,
        description="the samples the signal is mixed for (aliases accepted); None: the signal's name, which "
        "must then be a capability",
    )
    layer: LayerIndex | None = Field(None, description="the student's layer (negative from the end)")
    layers: tuple[LayerIndex, LayerIndex] | None = Field(None, description="the student's [first, last] layers")
    teacher_layer: LayerIndex | None = Field(None, description="the teacher's layer; the student's by depth")
    teacher_layers: tuple[LayerIndex, LayerIndex] | None = Field(None, description="the teacher's [first, last]")
    distance: Literal["mse", "cosine"] = Field("mse", description="distance between student and target")
    temperature: PositiveFloat = Field(1.0, description="logit_kl's softmax temperature")
    weight: PositiveFloat | None = Field(None, description="the loss's absolute weight (wins over share)")
    share: PositiveFloat | None = Field(
        None, description="the loss's share of the CE at the start, measured in every run; None: 0.1"
    )

    @field_validator("capability", mode="before")
    @classmethod
    def _alias(cls, value: Any) -> Any:
        return capability_of(value) or value

    @model_validator(mode="after")
    def _one_of_each(self) -> SignalSpec:
        for one, both in (("layer", "layers"), ("teacher_layer", "teacher_layers"), ("weight", "share")):
            if getattr(self, one) is not None and getattr(self, both) is not None:
                raise ValueError(f"give {one} or {both}, not both")
        return self


RECIPES = Path(__file__).parent / "recipes"


SHIPPED_CE_ONLY = "ce"  # the one recipe allowed to have no signals: the cross-entropy baseline, by name


def load_recipe(spec: str) -> dict[str, Signal]:
    """A shipped recipe name (`drive-kd`, `ce-kl`, ...) or a YAML path: {signal name: signal}.

    Each entry is checked against `SignalSpec` (unknown fields named with the closest valid one), and
    each signal's capability is its name or an explicit `capability:`, never a guess: a misspelt
    `planing` is refused rather than mixed into every sample."""
    path = Path(spec) if Path(spec).suffix in (".yaml", ".yml") else RECIPES / f"{spec}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise DriveKDError(f"recipe {spec!r}: no such file or shipped recipe ({shipped})")
    raw = read_yaml(path)
    if raw is None or raw == {}:
        if path.resolve() == (RECIPES / f"{SHIPPED_CE_ONLY}.yaml").resolve():
            return {}
        raise DriveKDError(
            f"{path}: the recipe has no signals; for cross-entropy alone use `recipe: {SHIPPED_CE_ONLY}` "
            "(or `drivekd sft`)"
        )
    if not isinstance(raw, dict):
        raise DriveKDError(f"{path}: a recipe maps signal names to their fields")
    signals = {}
    for name, fields in raw.items():
        where = f"{path}: signal {name!r}"
        if name == ANCHOR:
            raise DriveKDError(f"{path}: signal name {ANCHOR!r} is reserved for cross-entropy")
        if not isinstance(fields, dict):
            raise DriveKDError(f"{where}: expected its fields (kind, layer, ...), got {fields!r}")
        for key in fields:
            if key not in SignalSpec.model_fields:
                close = closest(key, SignalSpec.model_fields)
                hint = f" (did you mean {close!r}?)" if close else f" (fields: {', '.join(SignalSpec.model_fields)})"
                raise DriveKDError(f"{where}: unknown field {key!r}{hint}")
        try:
            entry = SignalSpec.model_validate(fields)
        except ValidationError as e:
            err, loc, _ = first_error(e)
            raise DriveKDError(f"{where}: {loc + ': ' if loc else ''}{err['msg'].removeprefix('Value error, ')}") from e
        named = capability_of(name)
        if entry.capability is None and named is None:
            close = closest(name, CAPABILITIES)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise DriveKDError(
                f"{where}: the name is not a capability ({', '.join(CAPABILITIES)}){hint}: name the signal after "
                "the capability whose samples it is mixed for, or give it `capability:` (a capability, or all)"
            )
        if entry.capability is not None and named is not None and entry.capability != named:
            raise DriveKDError(f"{where}: named after {named} but given `capability: {entry.capability}`")
        values = entry.model_dump(exclude={"kind", "capability"})
        signals[name] = make_signal(entry.kind, **values, capability=entry.capability or named)
    return signals


def check_recipe(config: DistillConfig) -> dict[str, Signal]:
    """Everything a distillation config can get wrong, found from configs alone, before any model,
    data or output folder is touched: the recipe itself, each signal's layers against the student's
    and its teacher's depths, and teacher and student of one family (maps compare position by
    position only when the tokenizer and visual tokens per image agree)."""
    from drivekd.models.capture import resolve_layer
    from drivekd.models.loading import PRESETS, model_shape

    signals = load_recipe(config.recipe)
    for key in config.teacher.per_signal:
        if key not in signals:
            close = closest(key, signals)
            hint = f"did you mean {close!r}?" if close else f"its signals: {', '.join(signals) or 'none'}"
            raise DriveKDError(f"teacher.per_signal.{key}: recipe {config.recipe!r} has no signal {key!r} ({hint})")
    student = model_shape(config.model.name)
    if config.teacher.device_map is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DriveKDError(
            "teacher.device_map spreads one teacher over this machine's devices; under torchrun every process "
            "would place its own copy over the same devices: run it in one process (docs/configuration.md)"
        )
    for name, sig in signals.items():
        teacher_spec = config.teacher.of(name)
        if teacher_spec is None:
            raise DriveKDError(f"signal {name!r} has no teacher: set `teacher` (or `teacher.per_signal.{name}`)")
        if config.teacher.device_map is not None and teacher_spec in PRESETS:
            raise DriveKDError(
                f"teacher.device_map: {teacher_spec} is a preset, built in memory; device_map places a checkpoint "
                "folder as it loads"
            )
        teacher = model_shape(teacher_spec)
        if student is not None and teacher is not None and student.family != teacher.family:
            raise DriveKDError(
                f"teacher {teacher_spec} is a {teacher.family} model and the student {config.model.name} a "
                f"{student.family} one: their visual tokens per image differ, so attention maps cannot be "
                "compared position by position; distil within one family"
            )
        if not sig.reads_layers:
            continue
        for who, shape, spec, indices in (
            ("student", student, config.model.name, sig.named_layers("student") or ()),
            ("teacher", teacher, teacher_spec, sig.named_layers("teacher") or ()),
        ):
            if shape is None:
                continue
            resolved = []
            for index in indices:
                try:
                    resolved.append(resolve_layer(index, shape.num_layers))
                except ValueError:
                    raise DriveKDError(
                        f"recipe {config.recipe}: signal {name!r}: layer {index} is outside the {who} {spec} "
                        f"({shape.num_layers} LM layers: use 0..{shape.num_layers - 1}, or negative from the end)"
                    ) from None
            if len(resolved) == 2 and resolved[0] > resolved[1]:
                raise DriveKDError(
                    f"recipe {config.recipe}: signal {name!r}: layers {list(indices)} are an empty range in the "
                    f"{who} {spec} ({shape.num_layers} LM layers)"
                )
    mixing_matrix(config.mixing, signals)  # a matrix of the wrong shape or with negative entries
    return signals


def mixing_matrix(spec: str | list[list[float]], signals: dict[str, Signal]) -> torch.Tensor:
    """Rows: sample capability (perception, reasoning, planning); columns: signals; rows sum to 1.

    `identity` and `reference` (0.8 on the signal's own capability, 0.1 elsewhere) read each signal's
    capability; a signal for `all` capabilities (e.g. logit KD) weighs 1 in every row before norming.
    """
    names = list(signals)
    if isinstance(spec, list):
        w = torch.tensor(spec, dtype=torch.float32)
        if w.ndim != 2 or w.shape != (len(CAPABILITIES), len(names)):
            raise DriveKDError(
                f"mixing matrix must be {len(CAPABILITIES)}x{len(names)} (capabilities x signals {names})"
            )
    else:
        w = torch.zeros(len(CAPABILITIES), len(names))
        for j, sig in enumerate(signals.values()):
            for i, cap in enumerate(CAPABILITIES):
                if sig.capability == "all":
                    w[i, j] = 1.0
                elif spec == "identity":
                    w[i, j] = float(sig.capability == cap)
                else:
                    w[i, j] = 0.8 if sig.capability == cap else 0.1
    if (w < 0).any():
        raise DriveKDError("mixing matrix entries must be >= 0")
    sums = w.sum(1, keepdim=True)
    return torch.where(sums > 0, w / sums.clamp_min(1e-12), w)
