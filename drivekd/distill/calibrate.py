"""Loss weights from a measurement, not a guess: each signal's weight makes its loss start at a
chosen share of the cross-entropy.

Attention-map distances are 1e-7..1e-5 at weight 1, hidden-state distances are O(1), so one fixed
weight means nothing across signals, models and data. This measures each loss at weight 1 with the
live teacher and the untrained student on the first batches of the run's own training data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from drivekd.atomic import atomic_file
from drivekd.data.sample import Sample
from drivekd.errors import DriveKDError
from drivekd.models.backend import VLMBackend
from drivekd.train.config import CombineConfig, DistillConfig, TeacherConfig


def initial_losses(
    config: DistillConfig, student: VLMBackend, samples: Sequence[Sample], *, batches: int = 4, batch_size: int = 8
) -> dict[str, float]:
    """Each loss at weight 1 (CE at ce_weight 1), averaged over the first `batches` batches."""
    from drivekd.distill.engine import ANCHOR, Distiller

    if not samples:
        raise DriveKDError("no training samples to calibrate on")
    # live teachers, plain sum: only forward passes; projection heads start alike for every recipe
    config = config.model_copy(
        update={
            "teacher": TeacherConfig(**{**config.teacher.model_dump(), "cache": None}),
            "combine": CombineConfig(strategy="sum"),
            "reweight": config.reweight.model_copy(update={"enabled": False}),
        }
    )
    torch.manual_seed(0)
    distiller = Distiller(config, student, samples)
    zero = [n for n, s in distiller.signals.items() if s.weight == 0]
    if zero or config.ce_weight == 0:
        raise DriveKDError(f"weights of 0 cannot be calibrated ({', '.join(zero) or 'ce_weight'})")
    scale = {ANCHOR: config.ce_weight, **{n: s.weight for n, s in distiller.signals.items()}}
    chunks = [samples[i : i + batch_size] for i in range(0, min(len(samples), batches * batch_size), batch_size)]
    totals: dict[str, float] = {}
    with torch.no_grad():
        for chunk in chunks:
            batch = student.build_batch(chunk).to(student.device)
            for name, value in distiller.objective(student.model, batch).items():
                totals[name] = totals.get(name, 0.0) + float(value) / scale[name] / len(chunks)
    return totals


def calibrated_weights(losses: dict[str, float], share: float) -> dict[str, float]:
    """Weight per signal so that weight x loss = share x CE at the start."""
    ce = losses["ce"]
    return {n: float(f"{share * ce / max(v, 1e-12):.6g}") for n, v in losses.items() if n != "ce"}


def run_calibrate(
    config: DistillConfig, out: Path, *, share: float = 0.1, batches: int = 4
) -> tuple[Path, dict[str, Any]]:
    """Write the config's recipe with calibrated weights to `out`; returns it and the measurement."""
    from drivekd.distill.engine import check_recipe
    from drivekd.train.sft import load_model, load_training_data

    if not share > 0:
        raise DriveKDError(f"--share must be positive, got {share}")
    signals = check_recipe(config)
    if not signals:
        raise DriveKDError(f"recipe {config.recipe!r} has no teacher signals: nothing to calibrate")
    student = load_model(config.model)
    train, _, _ = load_training_data(config.data, student)
    losses = initial_losses(config, student, train, batches=batches, batch_size=config.train.micro_batch_size)
    weights = calibrated_weights(losses, share)
    body = {n: {"kind": s.kind, **{k: v for k, v in vars(s).items() if v is not None}} for n, s in signals.items()}
    for name in body:
        if isinstance(body[name].get("layers"), tuple):
            body[name]["layers"] = list(body[name]["layers"])
        body[name]["weight"] = weights[name]
    header = (
        f"# {config.recipe} calibrated by `drivekd calibrate`: each loss starts at {share:g} x CE.\n"
        f"# Initial losses at weight 1 ({len(train)} training samples, first {batches} batches): "
        + ", ".join(f"{n} {v:.4g}" for n, v in losses.items())
        + "\n"
    )
    with atomic_file(out) as tmp:
        tmp.write_text(header + yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return out, {"share": share, "initial_losses": losses, "weights": weights}
