"""Loss weights from a measurement, not a guess: each signal's weight makes its loss start at its
`share` of the (plain, unweighted) cross-entropy.

Attention-map distances at weight 1 are orders of magnitude below the CE, hidden-state distances
are of its order (docs/results.md): one fixed weight means nothing across signals, models and data.
So a recipe states shares, and every distillation run measures each loss at weight 1 with its own
teachers (live or cached) and its own untrained student on a random sample of its training data
(`train.order.calibration_sample`), before step 1. The run folder keeps the measurement (`calibration.json`); a resumed run reads it back
instead of measuring again, so it continues bit-exactly.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from drivekd.atomic import atomic_file
from drivekd.data.sample import Sample
from drivekd.errors import DriveKDError
from drivekd.train.config import CombineConfig, DistillConfig, TeacherConfig

if TYPE_CHECKING:
    from drivekd.distill.engine import Distiller

DEFAULT_SHARE = 0.1  # of the CE at the start, for a signal that gives neither `share` nor `weight`
CALIBRATION_FILE = "calibration.json"


def shares_of(distiller: Distiller) -> dict[str, float]:
    """The share of each signal whose weight is to be measured (those without an explicit weight)."""
    return {n: s.share or DEFAULT_SHARE for n, s in distiller.signals.items() if s.weight is None}


def measure_initial_losses(
    distiller: Distiller, samples: Sequence[Sample], *, batches: int, batch_size: int
) -> dict[str, float]:
    """The CE and each signal's mixed loss at weight 1, averaged over the first `batches` batches of
    `samples`, from the distiller's own teachers. The global random state is left as it was."""
    if not samples:
        raise DriveKDError("no training samples to calibrate on")
    student = distiller.student
    chunks = [samples[i : i + batch_size] for i in range(0, min(len(samples), batches * batch_size), batch_size)]
    totals: dict[str, float] = {}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for chunk in chunks:
            batch = student.build_batch(chunk).to(student.device)
            for name, value in distiller.objective(student.model, batch, unit_weights=True).items():
                totals[name] = totals.get(name, 0.0) + float(value) / len(chunks)
    return totals


def weights_for_shares(losses: dict[str, float], shares: dict[str, float]) -> dict[str, float]:
    """Weight per signal so that weight x initial loss = share x initial CE."""
    from drivekd.distill.recipe import ANCHOR

    ce = losses[ANCHOR]
    if not (math.isfinite(ce) and ce > 0):
        raise DriveKDError(f"the initial cross-entropy is {ce}: loss shares cannot be measured against it")
    weights = {}
    for name, share in shares.items():
        loss = losses[name]
        if not (math.isfinite(loss) and loss > 0):
            raise DriveKDError(
                f"signal {name!r}: its initial loss is {loss} (the student already matches the teacher?), so no "
                "weight gives it a share of the CE; give it an explicit `weight` in the recipe"
            )
        weights[name] = float(f"{share * ce / loss:.6g}")
    return weights


def calibrate_run(
    distiller: Distiller,
    samples: Sequence[Sample],
    run_dir: Path,
    *,
    resume: bool,
    batches: int,
    batch_size: int,
    write: bool = True,
) -> dict[str, Any]:
    """Set the distiller's loss weights for a run: explicit weights as given, shares measured now (or,
    resuming, read from the run's `calibration.json`). Returns the record written there."""
    explicit = {n: float(s.weight) for n, s in distiller.signals.items() if s.weight is not None}
    shares = shares_of(distiller)
    file = run_dir / CALIBRATION_FILE
    if not shares:
        record: dict[str, Any] = {"shares": {}, "initial_losses": {}, "weights": explicit}
    elif resume and file.is_file():
        record = json.loads(file.read_text(encoding="utf-8"))
        if record.get("shares") != shares:
            raise DriveKDError(
                f"{file}: the run was calibrated for shares {record.get('shares')}, this config asks for {shares}; "
                "resume with the run's own recipe"
            )
    elif resume:
        raise DriveKDError(f"{run_dir}: no {CALIBRATION_FILE} to resume from: the run's loss weights are unknown")
    else:
        losses = measure_initial_losses(distiller, samples, batches=batches, batch_size=batch_size)
        weights = {**explicit, **weights_for_shares(losses, shares)}
        record = {"shares": shares, "initial_losses": losses, "weights": weights, "batches": batches}
    weights = {n: record["weights"][n] for n in distiller.names}
    distiller.set_weights(weights)
    if write and not resume:  # a resumed run's record stays as measured (a finished one writes nothing)
        with atomic_file(file) as tmp:
            tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    if shares and not resume:
        losses = record["initial_losses"]
        print(
            "loss weights: "
            + ", ".join(
                f"{n} {w:.4g} (share {shares[n]:g}: initial loss {losses[n]:.3g} vs CE {losses['ce']:.3g})"
                if n in shares
                else f"{n} {w:.4g} (given)"
                for n, w in weights.items()
            ),
            file=sys.stderr,
        )
    return record


def initial_losses(
    config: DistillConfig, student: Any, samples: Sequence[Sample], *, batches: int = 16, batch_size: int = 8
) -> dict[str, float]:
    """Each loss at weight 1 with the config's live teachers and an untrained `student` (no cache,
    plain sum: only forward passes)."""
    from drivekd.distill.engine import Distiller

    config = config.model_copy(
        update={
            "teacher": TeacherConfig(**{**config.teacher.model_dump(), "cache": None}),
            "combine": CombineConfig(strategy="sum"),
        }
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # projection heads start alike for every recipe
        distiller = Distiller(config, student, samples)
    return measure_initial_losses(distiller, samples, batches=batches, batch_size=batch_size)


def run_calibrate(
    config: DistillConfig, out: Path, *, share: float | None = None, batches: int = 16
) -> tuple[Path, dict[str, Any]]:
    """Write the config's recipe with measured absolute weights to `out`; returns it and the
    measurement. `share` overrides every signal's; otherwise each signal's own share is used."""
    from drivekd.distill.recipe import check_recipe
    from drivekd.train.order import calibration_sample
    from drivekd.train.sft import load_model, load_training_data

    if share is not None and not (math.isfinite(share) and share > 0):
        raise DriveKDError(f"--share must be a positive number, got {share}")
    signals = check_recipe(config)
    if not signals:
        raise DriveKDError(f"recipe {config.recipe!r} has no teacher signals: nothing to calibrate")
    student = load_model(config.model)
    train, _, _ = load_training_data(config.data, student)
    first = calibration_sample(train, config.train, batches)  # what a run of this config measures
    losses = initial_losses(config, student, first, batches=batches, batch_size=config.train.micro_batch_size)
    shares = {n: share if share is not None else (s.share or DEFAULT_SHARE) for n, s in signals.items()}
    weights = weights_for_shares(losses, shares)
    body = {}
    for name, sig in signals.items():
        entry = {k: v for k, v in sig.recipe_entry().items() if k not in ("share", "weight")}
        body[name] = {**entry, "weight": weights[name]}
    header = (
        f"# {config.recipe} calibrated by `drivekd calibrate`: each loss starts at its share of the CE "
        f"({', '.join(f'{n} {v:g}' for n, v in shares.items())}).\n"
        f"# Initial losses at weight 1 ({len(train)} training samples, first {batches} batches): "
        + ", ".join(f"{n} {v:.4g}" for n, v in losses.items())
        + "\n"
    )
    with atomic_file(out) as tmp:
        tmp.write_text(header + yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return out, {"shares": shares, "initial_losses": losses, "weights": weights}
