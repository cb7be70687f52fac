"""How much a calibrated loss weight moves with the sample it is measured on.

    drivekd data generate --out runs/drivesim-qa --scenes 400      # the README quick start's data
    python experiments/calibration_spread.py                        # its distill config, 5 samples

A weight is made from the ratio of a signal's loss to the CE on the untrained student
(`drivekd distill` measures it before step 1). This measures that ratio on `--samples` random
training samples of each size (`--batches` micro-batches of the config's batch size, drawn as a
run with that seed draws them) and prints, per size, each signal's coefficient of variation
(std / mean over the samples). Shipped teacher and student base unless the config says otherwise.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def spread(ratios: dict[str, list[float]]) -> dict[str, float]:
    """Coefficient of variation (population std / mean) of each signal's loss-to-CE ratios."""
    return {name: statistics.pstdev(v) / statistics.mean(v) for name, v in ratios.items()}


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "distill-tiny-internvl.yaml")
    parser.add_argument("--samples", type=int, default=5, help="random samples per size (seeds 0..N-1)")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16], help="micro-batches per sample")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args(argv)

    # drivekd is imported here, so that importing this file costs nothing
    from drivekd.distill.calibrate import initial_losses
    from drivekd.train.config import DistillConfig, load_config
    from drivekd.train.order import calibration_sample
    from drivekd.train.sft import load_model, load_training_data

    cfg = load_config(DistillConfig, args.config, args.overrides)
    student = load_model(cfg.model)
    train, _, _ = load_training_data(cfg.data, student)
    batch_size = cfg.train.micro_batch_size
    out: dict[int, dict[str, float]] = {}
    for batches in args.batches:
        ratios: dict[str, list[float]] = {}
        for seed in range(args.samples):
            sample = calibration_sample(train, cfg.train.model_copy(update={"seed": seed}), batches)
            losses: dict[str, Any] = initial_losses(cfg, student, sample, batches=batches, batch_size=batch_size)
            for name, value in losses.items():
                if name != "ce":
                    ratios.setdefault(name, []).append(value / losses["ce"])
        out[batches] = spread(ratios)
        cells = ", ".join(f"{n} {v:.2f}" for n, v in out[batches].items())
        print(f"{batches} batches of {batch_size} ({batches * batch_size} samples): coefficient of variation {cells}")
    return out


if __name__ == "__main__":
    main()
