"""The parts a distillation config adds to a step: teachers (live or cached), captured attention
maps, the signal losses and their targets."""

from __future__ import annotations

from typing import Any

from drivekd.bench.plan.formulas import (
    Step,
    cache_reads,
    captured_maps,
    hidden_losses,
    live_teacher,
    logit_kl_loss,
    map_losses,
    map_recompute,
    teacher_targets,
    weights,
)
from drivekd.bench.plan.model import Arch, arch
from drivekd.bench.plan.phases import LOSSES, SAVED, TEACHER, TRANSIENT
from drivekd.bench.plan.units import DTYPE_BYTES
from drivekd.distill.cache import STORAGES, estimate_bytes


def distill_parts(
    config: Any,
    student: Arch,
    step: Step,
    image: tuple[int, int],
    notes: list[str],
    questions_per_frame: float | None = None,
) -> dict[str, Any]:
    """Teachers, captured maps, signal losses and targets of a distillation config: parts as
    {name: (bytes, where it counts)}."""
    from drivekd.distill.recipe import check_recipe

    signals = check_recipe(config)
    teacher_of = {n: str(config.teacher.of(n)) for n in signals}
    cached = bool(config.teacher.cache) and bool(signals)
    t_bytes = DTYPE_BYTES[config.teacher.dtype]
    teachers = {ckpt: arch(ckpt, "null", image) for ckpt in dict.fromkeys(teacher_of.values())}
    # the same bound signals the distiller and the teachers read (drivekd/distill/signals.py)
    bound = {name: sig.bind(name, student.layers, teachers[teacher_of[name]].layers) for name, sig in signals.items()}

    def rows(b: Any) -> int:
        # text->vision signals read the text rows of a map (R x T), the others the whole map (T x T)
        return step.text if b.reads == "text_rows" else step.tokens

    def target_elements(b: Any, t: Arch) -> int:
        if b.reads in ("maps", "text_rows"):
            return rows(b) * step.tokens
        return b.signal.stored_elements(step.tokens, step.visual, t.hidden, t.vocab)  # hidden: T x width, logits: T x V

    captured: dict[int, int] = {}
    whole, text_rows = set(), set()
    pair_rows: list[int] = []
    elements: list[int] = []
    projection_params = 0
    hidden_pairs, hidden_width, kl_vocab = 0, 0, 0
    for name, b in bound.items():
        sig, t, pairs = b.signal, teachers[teacher_of[name]], b.pairs
        if b.reads in ("maps", "text_rows"):
            (whole if b.reads == "maps" else text_rows).update(b.student_layers)
            for layer in b.student_layers:  # a layer some signal needs whole serves the text-row signals too
                captured[layer] = max(captured.get(layer, 0), rows(b))
                pair_rows.append(rows(b))
        if sig.needs_hidden:
            hidden_pairs += len(pairs)
            hidden_width = max(hidden_width, t.hidden)
            if t.hidden != student.hidden:
                projection_params += student.hidden * t.hidden  # a Linear(student width, teacher width)
        if sig.needs_logits:
            kl_vocab = max(kl_vocab, t.vocab)
        elements += [target_elements(b, t) for _ in pairs]
    parts: dict[str, tuple[int, str]] = {}
    if captured:
        parts["captured attention maps"] = (captured_maps(student, step, captured), SAVED)
        parts["captured-map recompute"] = (map_recompute(student, step, captured), TRANSIENT)
        parts["attention-map losses"] = (map_losses(step, pair_rows), SAVED)
    if hidden_pairs:
        checkpointed = config.train.activation_checkpointing
        parts["hidden-state losses"] = (hidden_losses(student, step, hidden_pairs, hidden_width, checkpointed), LOSSES)
    if kl_vocab:
        parts["logit-KL loss"] = (logit_kl_loss(step, kl_vocab), LOSSES)
    teacher_weights = 0
    if cached:
        # read before the student's forward (its map losses are taken inside it), kept until its backward
        parts["teacher cache reads"] = (cache_reads(step, elements, _cached_value_bytes(config.teacher.cache)), SAVED)
        notes.append(
            "teacher.cache: no teacher on the device; each sample's targets are read from the memory-mapped "
            "shards, the next micro-batch's while this one trains"
        )
    elif signals:
        live = 0
        for ckpt, t in teachers.items():
            maps: dict[int, int] = {}
            hidden_layers, logits = 0, False
            for name, b in bound.items():
                if teacher_of[name] != ckpt:
                    continue
                if b.reads in ("maps", "text_rows"):
                    for tl in b.teacher_layers:
                        maps[tl] = max(maps.get(tl, 0), rows(b))
                if b.reads == "hidden":
                    hidden_layers = max(hidden_layers, max(b.teacher_layers, default=0) + 3)  # it runs one layer deeper
                logits = logits or b.reads == "logits"
            live += live_teacher(t, step, t_bytes, maps, hidden_layers, logits)
            teacher_weights += weights(t.parameters, t_bytes)
        parts["live teacher forward"] = (live, TEACHER)
        parts["teacher targets"] = (teacher_targets(step, elements, t_bytes), SAVED)
    info = [
        {
            "name": ckpt,
            "parameters": t.parameters,
            "layers": t.layers,
            "dtype": config.teacher.dtype,
            "on_device": not cached,
            "device_map": None if cached else config.teacher.device_map,
            "signals": [name for name in signals if teacher_of[name] == ckpt],
        }
        for ckpt, t in teachers.items()
    ]
    # what `drivekd cache-teacher` would write per sample at the planned length (the same estimate it prints)
    widths = {name: teachers[teacher_of[name]].hidden for name in bound}
    per_sample = {s: estimate_bytes(bound, [step.tokens], [step.visual], widths, student.vocab, s) for s in STORAGES}
    # each frame's prefix (at least its visual tokens) stored once for `questions` questions
    questions = questions_per_frame or 1.0
    shared = {
        s: estimate_bytes(
            bound,
            [step.tokens],
            [step.visual],
            widths,
            student.vocab,
            s,
            prefixes=[step.visual],
            questions_per_frame=questions,
        )
        for s in STORAGES
    }
    return {
        "teachers": info,
        "captured": {"maps": sorted(whole), "text_rows": sorted(text_rows - whole)},  # the student's layers
        "teacher_weights": teacher_weights,
        "parts": parts,
        "losses": 1 + len(signals),  # CE and each signal
        # the buffer path backpropagates CE and then each signal in the recipe's order, keeping the graph
        # for the next one: a pass that enters a checkpointed layer through its attention map recomputes
        # the whole layer and uses only the map's part, and the rest stays alive with the graph until
        # the last pass (torch's checkpoint frees a recomputed tensor when it is used)
        "map_passes_kept": sum(bound[name].reads in ("maps", "text_rows") for name in list(signals)[:-1]),
        "all_logits": bool(kl_vocab),  # a signal reads logits: the head runs at every position
        "projection_params": projection_params,
        "cache_bytes_per_sample": per_sample if signals else None,
        "cache_bytes_per_sample_shared": shared if signals else None,
        "questions_per_frame": questions,
    }


def _cached_value_bytes(folder: str) -> int:
    """Bytes per target value as the distiller holds them: 2 for an fp16 cache (the default, and what
    is assumed when the folder cannot be read here), 4 for an fp8 one (dequantised to fp32)."""
    import json
    from pathlib import Path

    try:
        storage = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8")).get("storage", "fp16")
    except (OSError, ValueError):
        storage = "fp16"
    return 2 if storage == "fp16" else 4
