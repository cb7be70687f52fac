"""A config, planned: the parts of one training step of an SFT or distillation config, the phases
they count in, the peak against the device's budget, FSDP's sharded figures and, when it does not
fit, the advice."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from drivekd.bench.plan.advice import advice
from drivekd.bench.plan.distill import distill_parts
from drivekd.bench.plan.formulas import (
    Step,
    agp_buffer,
    agp_combination,
    agp_grad_result,
    autocast_copies,
    ce_backward,
    checkpointed,
    ddp_buckets,
    fsdp_gather,
    gradients,
    gram_pass,
    lm_edges,
    lm_layers,
    logits_and_loss,
    optimiser_state,
    optimiser_step,
    patch_inputs,
    projector,
    vision_tower,
    weights,
)
from drivekd.bench.plan.inputs import Inputs, count_samples, peek_data
from drivekd.bench.plan.model import DEFAULT_IMAGE, Arch, arch
from drivekd.bench.plan.phases import BACKWARD, RESIDENT, SAVED, TRANSIENT, Plan, phases_of
from drivekd.bench.plan.units import DTYPE_BYTES, GiB
from drivekd.errors import DriveKDError

# No tensor holds the CUDA context or the caching allocator's fragmentation: on a GPU a plan fits
# when its peak is within this share of the device, less the context.
CUDA_CONTEXT = 1 * GiB
ALLOCATOR_SHARE = 0.95


def plan(config: BaseModel, inputs: Inputs | None = None, *, advise: bool = True) -> Plan:
    """The predicted per-device peak of one training step of `config` (SFTConfig or DistillConfig)."""
    from drivekd.train.config import DistillConfig

    inputs = inputs or Inputs()
    distill = isinstance(config, DistillConfig)
    notes: list[str] = []
    peek = peek_data(config.data) if inputs.images is None or inputs.image is None else None
    image = inputs.image or (peek[1] if peek else DEFAULT_IMAGE)
    lora = json.dumps(config.model.lora, sort_keys=True) if config.model.lora else "null"
    student = arch(config.model.name, lora, image)
    images = inputs.images if inputs.images is not None else (peek[0] if peek else 1)
    if inputs.images is None and peek is None:
        notes.append(f"1 image per sample assumed ({config.data.path} is not readable here; --images N sets it)")
    tokens = inputs.tokens if inputs.tokens is not None else config.data.max_length
    visual = images * student.visual_tokens
    if visual >= tokens:
        raise DriveKDError(
            f"{images} image(s) x {student.visual_tokens} visual tokens = {visual} leave no text in {tokens} "
            "tokens: raise --tokens (or data.max_length), or lower --images"
        )
    s_bytes = DTYPE_BYTES[config.model.dtype]
    mixed = config.train.mixed_precision
    micro, accum = config.train.micro_batch_size, config.train.grad_accum
    padded = inputs.padded if inputs.padded is not None else micro > 1
    step = Step(micro, tokens, images, visual, 2 if mixed != "no" else s_bytes, padded, inputs.answer_tokens)
    if inputs.answer_tokens is None:
        notes.append(
            f"the LM head's CE rows: every one of the {step.text} text tokens assumed to be an answer token "
            "(an upper bound; --answer-tokens N sets the longest answer)"
        )

    by_part = student.trainable(config.model)
    if sum(by_part.values()) == 0:
        raise DriveKDError(f"{config.model.name}: no trainable parameters: everything is frozen")
    vision_graph = by_part["vision"] > 0
    counted_data = count_samples(config.data) if distill else None
    questions = inputs.questions_per_frame or (counted_data[0] / max(counted_data[1], 1) if counted_data else None)
    d = distill_parts(config, student, step, image, notes, questions) if distill else None
    extra = d["projection_params"] if d else 0  # hidden-state projection heads, trained beside the model
    trainable = sum(by_part.values()) + extra
    largest = max(student.largest_tensor, extra)
    strategy = config.combine.strategy if distill else "sum"
    losses = d["losses"] if d else 1
    agp = strategy != "sum" and losses > 1
    # the buffer path writes every loss's gradient into a (k, P) buffer; the modules path takes the
    # Gram matrix from one k-batched backward and ends in an ordinary backward (distill/gramian.py)
    modules_gram = agp and getattr(config.combine, "gram", "buffer") == "modules"
    buffered = agp and not modules_gram
    # accumulation keeps earlier micro-batches' gradients through the next pass; otherwise a plain
    # backward makes them as it frees activations (the LM head's first, all of them at its end), and a
    # projection strategy writes them at the combination
    grads_in_pass = accum > 1
    step_phase, vision_phase, backward_end = "optimiser step", "vision forward", "backward end"
    plain_end = not buffered and not grads_in_pass

    parts: dict[str, int] = {}
    counted: dict[str, list[str]] = {}

    def add(name: str, value: int, *where: str) -> None:
        if value:
            parts[name], counted[name] = value, list(where)

    add("weights", weights(student.parameters + extra, s_bytes), RESIDENT)
    add("teacher weights", d["teacher_weights"] if d else 0, RESIDENT)
    add("optimiser state", optimiser_state(trainable, s_bytes), RESIDENT)
    add(
        "gradients",
        gradients(trainable, s_bytes),
        *([SAVED, vision_phase] if grads_in_pass else []),
        *(["combination"] if buffered else []),
        *([backward_end] if plain_end else []),
        step_phase,
    )
    if plain_end and by_part["llm"] and student.lora is None:
        add("LM-head gradient", gradients(student.head, s_bytes), TRANSIENT)  # made once CE's backward is done
    checkpointing = config.train.activation_checkpointing
    if vision_graph:  # the tower's and projector's backward come last, beside nearly every gradient
        saved = vision_tower(student, step, True)
        if checkpointing:
            patches = patch_inputs(student, step)
            per_layer = step.batch * step.images * student.vision_tokens
            saved, recomputed = checkpointed(
                saved - patches, student.vision_layers, per_layer, student.vision_hidden, s_bytes
            )
            saved += patches
            add("a checkpointed vision layer recomputed", recomputed, TRANSIENT, *([backward_end] if plain_end else []))
        add("activations: vision tower", saved, SAVED, *([backward_end] if plain_end else []))
    else:
        add("vision tower forward (frozen)", vision_tower(student, step, False), vision_phase)
    add(
        "activations: projector",
        projector(student, step, vision_graph or by_part["projector"] > 0),
        SAVED,
        *([backward_end] if plain_end else []),
    )
    layers = lm_layers(student, step)
    if checkpointing:
        layers, recomputed = checkpointed(layers, student.layers, step.batch * step.tokens, student.hidden, s_bytes)
        add("a checkpointed decoder layer recomputed", recomputed, TRANSIENT)
        if buffered and d:
            add("checkpointed layers recomputed by earlier task passes", d["map_passes_kept"] * recomputed, BACKWARD)
    add("activations: language model", layers + lm_edges(student, step), SAVED)
    all_logits = bool(d and d["all_logits"])
    add("activations: logits and log-softmax", logits_and_loss(student, step, all_logits), SAVED)
    add("CE backward", ce_backward(student, step, all_logits), TRANSIENT)
    for name, (value, where) in (d["parts"] if d else {}).items():
        add(name, value, where)
    add("autocast weight copies", autocast_copies(trainable, s_bytes, mixed), SAVED)
    if modules_gram:
        add(
            "Gram pass: k of its largest transient",
            gram_pass(student, step, losses, trainable, s_bytes, all_logits),
            TRANSIENT,
        )
    if buffered:
        from drivekd.distill import aggregate

        buffer_bytes = DTYPE_BYTES[getattr(config.combine, "buffer_dtype", None) or config.model.dtype]
        pending = config.combine.project_per == "step" and accum > 1  # the step's running sum beside the new one
        combine_temp = agp_combination(losses, largest, buffer_bytes, getattr(aggregate, "GRAM_CHUNK", 0))
        if config.combine.project_per == "step" and inputs.gpus > 1:
            combine_temp += agp_buffer(trainable, losses, buffer_bytes)  # reduced across processes into a new one
        add("AGP buffer", agp_buffer(trainable, losses, buffer_bytes) * (2 if pending else 1), BACKWARD, "combination")
        in_place = buffer_bytes == s_bytes
        add("AGP gradient of one loss", agp_grad_result(trainable, largest, s_bytes, in_place), BACKWARD)
        add("AGP combination temporaries", combine_temp, "combination")
    ddp = ddp_buckets(trainable, s_bytes, inputs.gpus)
    add(
        "DDP gradient buckets",
        ddp,
        SAVED,
        *(["combination"] if buffered else []),
        *([backward_end] if plain_end else []),
        step_phase,
        *([] if vision_graph else [vision_phase]),
    )
    add("optimiser step temporary", optimiser_step(trainable, largest, s_bytes, inputs.device), step_phase)

    phases = phases_of(parts, counted)
    peak = phases[RESIDENT] + max(v for k, v in phases.items() if k != RESIDENT)
    budget = device_budget(inputs)
    result = Plan(
        kind="distill" if distill else "sft",
        student={
            "name": config.model.name,
            "distributed": config.train.distributed,
            "family": student.family,
            "dtype": config.model.dtype,
            "parameters": student.parameters,
            "trainable": trainable,
            "trainable_by_part": by_part,
            "layers": student.layers,
            "hidden": student.hidden,
            "heads": student.heads,
            "kv_heads": student.kv_heads,
            "intermediate": student.intermediate,
            "vocab": student.vocab,
            "visual_tokens_per_image": student.visual_tokens,
        },
        teachers=d["teachers"] if d else [],
        step={
            "micro_batch": step.batch,
            "grad_accum": accum,
            "tokens": step.tokens,
            "images": step.images,
            "visual_tokens": step.visual,
            "text_tokens": step.text,
            "answer_tokens": step.head_rows,
            "activation_bytes": step.act_bytes,
            "activation_checkpointing": checkpointing,
            "strategy": strategy,
            "losses": losses,
            "captured_layers": d["captured"] if d else None,
            "gpus": inputs.gpus,
            "device": inputs.device,
        },
        parts=parts,
        counted=counted,
        phases=phases,
        peak=peak,
        budget=budget,
        fits=peak <= budget,
        cache=_cache(d, counted_data, step.tokens) if d and d["cache_bytes_per_sample"] else None,
        notes=notes,
    )
    if inputs.gpus > 1:
        result.fsdp = _fsdp(result, student, s_bytes, inputs.gpus)
        notes.append(
            f"--gpus {inputs.gpus}: under DDP (train.distributed: ddp) every device holds the figures above "
            f"(micro batch {step.batch} per device); under train.distributed: fsdp weights, gradients, optimiser "
            f"state and AGP buffers are sharded {inputs.gpus} ways; the root unit (vision tower, projector, "
            "embeddings, head) is gathered through the forward and again through the backward"
        )
    if result.fsdp is not None and config.train.distributed == "fsdp":
        result.fits = result.fsdp["peak"] <= budget  # the config shards: its figure is FSDP's
    if buffered and config.combine.amortize_every:
        notes.append(
            "combine.amortize_every does not lower the peak: every N-th step still builds the (k, P) buffer. "
            "What does: combine.gram modules (no buffer), combine.buffer_dtype bfloat16, fewer signals, "
            "combine.strategy sum, or FSDP"
        )
    if advise and not result.fits:
        result.advice = advice(config, inputs, result)
    return result


def device_budget(inputs: Inputs) -> int:
    total = int(inputs.device_memory_gb * GiB)
    return int(total * ALLOCATOR_SHARE) - CUDA_CONTEXT if inputs.device == "cuda" else total


SHARDED = (
    "weights",
    "optimiser state",
    "gradients",
    "AGP buffer",
    "AGP gradient of one loss",
    "optimiser step temporary",
)


def _fsdp(p: Plan, student: Arch, s_bytes: int, gpus: int) -> dict[str, Any]:
    """The same step with weights, gradients, optimiser state and AGP buffers sharded `gpus` ways, plus
    the gathered units; DDP's buckets are gone."""
    parts = {k: v // gpus if k in SHARDED else v for k, v in p.parts.items() if k != "DDP gradient buckets"}
    counted = {k: p.counted[k] for k in parts}
    parts["FSDP gathered units"] = fsdp_gather(student, s_bytes)
    counted["FSDP gathered units"] = [SAVED, *(ph for ph in ("backward end", "vision forward") if ph in p.phases)]
    phases = phases_of(parts, counted)
    peak = phases[RESIDENT] + max(v for k, v in phases.items() if k != RESIDENT)
    return {"gpus": gpus, "parts": parts, "counted": counted, "phases": phases, "peak": peak}


def _cache(d: dict[str, Any], counted: tuple[int, int] | None, tokens: int) -> dict[str, Any]:
    """The teacher cache of the config's data if every sample had the planned length (an upper bound),
    each frame's prefix stored once or per question."""
    samples = counted[0] if counted else None
    per_sample, shared = d["cache_bytes_per_sample"], d["cache_bytes_per_sample_shared"]
    return {
        "tokens": tokens,
        "samples": samples,
        "frames": counted[1] if counted else None,
        "questions_per_frame": d["questions_per_frame"],
        "bytes_per_sample": shared,
        "bytes_per_sample_unshared": per_sample,
        "bytes": {s: b * samples for s, b in shared.items()} if samples is not None else None,
    }
