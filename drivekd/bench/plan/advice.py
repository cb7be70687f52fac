"""What to change when a plan does not fit: each change planned again, ranked by bytes saved."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from drivekd.bench.plan.inputs import Inputs
from drivekd.bench.plan.phases import Plan

# The LoRA the advice suggests: the language model's attention projections only. A plain
# [q_proj, k_proj, v_proj, o_proj] list also adapts InternViT's q/k/v, whose activations then stay.
LORA_ADVICE = {"r": 16, "lora_alpha": 32, "target_modules": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"}


def _with(config: BaseModel, section: str, **changes: Any) -> BaseModel:
    return config.model_copy(update={section: getattr(config, section).model_copy(update=changes)})


def _accepted(config: BaseModel) -> bool:
    """Whether the config reader takes this changed config (`model_copy` validates nothing)."""
    from pydantic import ValidationError

    try:
        type(config).model_validate(config.model_dump())
    except ValidationError:
        return False
    return True


def figure(p: Plan) -> int:
    """The peak a plan is judged by: the sharded one for a config that sets train.distributed: fsdp."""
    return p.fsdp["peak"] if p.fsdp is not None and p.student.get("distributed") == "fsdp" else p.peak


def advice(config: BaseModel, inputs: Inputs, current: Plan) -> list[dict[str, Any]]:
    """What to change when the plan does not fit, each change planned again, ranked by bytes saved."""
    # imported here, not at the top: the planner imports this module to call `advice`
    from drivekd.bench.plan.planner import plan
    from drivekd.train.config import DistillConfig

    m = config.model
    distill = isinstance(config, DistillConfig)
    options: list[tuple[str, dict[str, Any], Callable[[], int | None]]] = []

    def peak_of(changed: BaseModel) -> Callable[[], int]:
        return lambda: figure(plan(changed, inputs, advise=False))

    sharded_now = config.train.distributed == "fsdp"  # LoRA is refused with it

    if not m.lora and current.student["trainable_by_part"]["vision"] > 0:
        options.append(
            (
                "freeze the vision tower",
                {"model.freeze_vision": True},
                peak_of(_with(config, "model", freeze_vision=True)),
            )
        )
    if m.lora and current.student["trainable_by_part"]["vision"] > 0:
        # target_modules such as [q_proj, ...] also match InternViT's q/k/v: its activations then stay
        only_lm = {**m.lora, "target_modules": LORA_ADVICE["target_modules"]}
        options.append(
            (
                "LoRA on the language model only",
                {"model.lora.target_modules": only_lm["target_modules"]},
                peak_of(_with(config, "model", lora=only_lm)),
            )
        )
    if not m.lora and not sharded_now:
        lora = _with(config, "model", lora=LORA_ADVICE)
        options.append(
            ("LoRA on the language model's attention projections", {"model.lora": LORA_ADVICE}, peak_of(lora))
        )
    if m.dtype == "float32":
        bf16 = _with(_with(config, "model", dtype="bfloat16"), "train", mixed_precision="bf16")
        options.append(("bf16 weights", {"model.dtype": "bfloat16", "train.mixed_precision": "bf16"}, peak_of(bf16)))
    if distill and current.teachers and not config.teacher.cache:
        options.append(
            (
                "teacher targets from a cache (run `drivekd cache-teacher` first) instead of a live teacher",
                {"teacher.cache": "DIR"},
                peak_of(_with(config, "teacher", cache="DIR")),
            )
        )
    checkpointed = _with(config, "train", activation_checkpointing=True)
    if not config.train.activation_checkpointing and _accepted(checkpointed):
        options.append(
            (
                "activation checkpointing (each layer runs again in the backward pass: about one more forward's "
                "time, the same gradients)",
                {"train.activation_checkpointing": True},
                peak_of(checkpointed),
            )
        )
    agp = "AGP buffer" in current.parts
    buffer_dtype = config.combine.buffer_dtype if distill else None
    if agp and (buffer_dtype or m.dtype) == "float32":
        options.append(
            (
                "the AGP buffer in bf16",
                {"combine.buffer_dtype": "bfloat16"},
                peak_of(_with(config, "combine", buffer_dtype="bfloat16")),
            )
        )
    if agp and config.combine.project_per == "micro_batch" and config.train.distributed != "fsdp":
        options.append(
            (
                "AGP's Gram matrix from one k-batched backward, no buffer (exact; slower per exact step)",
                {"combine.gram": "modules"},
                peak_of(_with(config, "combine", gram="modules", buffer_dtype=None)),
            )
        )
    if agp:
        summed = _with(config, "combine", strategy="sum", amortize_every=None)
        fields: dict[str, Any] = {"combine.strategy": "sum"}
        options.append(("summed gradients, no projection (changes the method)", fields, peak_of(summed)))
    micro, accum = config.train.micro_batch_size, config.train.grad_accum
    for smaller in (k for k in range(micro - 1, 0, -1) if micro % k == 0):
        candidate = _with(config, "train", micro_batch_size=smaller, grad_accum=accum * micro // smaller)
        peak = figure(plan(candidate, inputs, advise=False))
        if peak <= current.budget or smaller == 1:
            options.append(
                (
                    f"micro batch {smaller} with {accum * micro // smaller}x accumulation (the same samples per step)",
                    {"train.micro_batch_size": smaller, "train.grad_accum": accum * micro // smaller},
                    lambda p=peak: p,
                )
            )
            break
    # what the config reader refuses with fsdp is not offered it
    may_shard = not m.lora and config.train.mixed_precision != "fp16"
    if distill and config.combine.gram == "modules" and config.combine.strategy != "sum":
        may_shard = False
    for gpus in (2, 4, 8, 16) if may_shard else ():
        if gpus <= inputs.gpus and gpus != 16:
            continue
        sharded = plan(config, dataclasses.replace(inputs, gpus=gpus), advise=False).fsdp
        assert sharded is not None
        if sharded["peak"] <= current.budget or gpus == 16:
            fields = {"train.distributed": "fsdp", "launch": f"torchrun --nproc-per-node {gpus}"}
            options.append((f"FSDP across {gpus} GPUs", fields, lambda p=sharded["peak"]: p))
            break
    rows = []
    for change, fields, peak_fn in options:
        peak = peak_fn()
        saves = None if peak is None else figure(current) - peak
        fits = None if peak is None else peak <= current.budget
        rows.append({"change": change, "fields": fields, "saves": saves, "peak": peak, "fits": fits})
    rows.sort(key=lambda r: -1 if r["saves"] is None else -r["saves"])
    return rows
