"""What the lossy fp8 cache storage costs: each signal's loss and gradient from fp8 targets against
the live teacher's exact targets (and fp16's, the default, for scale).

Writes an fp16 and an fp8 cache of the config's first samples with `drivekd cache-teacher`'s own
code, then, for the same batches and the same untrained student, computes each signal's loss at
weight 1 and its gradient over the student's trainable parameters with the live teacher, the fp16
cache and the fp8 cache:

    python experiments/cache_lossy.py --config configs/distill-tiny-internvl.yaml --samples 32

Prints one JSON object: per storage, bytes per sample, and per signal the largest relative error of
the loss over the batches and the smallest cosine between its gradient and the exact one (the
comparison is `drivekd.bench.cache.lossy_errors`, which `drivekd bench cache` reports too).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="a distill config (its teacher is run live)")
    parser.add_argument("--samples", type=int, default=32, help="training samples compared (data.limit)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides, e.g. recipe=PATH")
    args = parser.parse_args(argv)

    from drivekd.bench.cache import cache_figures, lossy_errors
    from drivekd.distill.run import run_cache_teacher
    from drivekd.train.config import DistillConfig, load_config
    from drivekd.train.sft import load_model, load_training_data

    with tempfile.TemporaryDirectory() as tmp:
        base = load_config(
            DistillConfig,
            args.config,
            [*args.overrides, f"data.limit={args.samples}", "teacher.cache=null", f"train.output_dir={tmp}/run"],
        )
        caches = {s: run_cache_teacher(base, Path(tmp) / s, storage=s, echo=lambda _: None) for s in ("fp16", "fp8")}
        student = load_model(base.model)
        train, val, _ = load_training_data(base.data, student)
        # every training sample, in batches, against the live teacher (the Distiller sees train + val,
        # the samples the caches were written for)
        errors = lossy_errors(base, student, train + val, dict(caches), args.batch, len(train))
        result: dict[str, Any] = {"samples": len(train)}
        for storage, folder in caches.items():
            result[storage] = {"bytes_per_sample": cache_figures(folder)["bytes_per_question"], **errors[storage]}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
