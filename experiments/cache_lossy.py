"""What the lossy fp8 cache storage costs: each signal's loss and gradient from fp8 targets against
the live teacher's exact targets (and fp16's, the default, for scale).

Writes an fp16 and an fp8 cache of the config's first samples with `drivekd cache-teacher`'s own
code, then, for the same batches and the same untrained student, computes each signal's loss at
weight 1 and its gradient over the student's trainable parameters with the live teacher, the fp16
cache and the fp8 cache:

    python experiments/cache_lossy.py --config configs/distill-tiny-internvl.yaml --samples 32

Prints one JSON object: per storage, bytes per sample, and per signal the largest relative error of
the loss over the batches and the smallest cosine between its gradient and the exact one.
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

    import torch

    from drivekd.distill.engine import Distiller
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
        params = [p for p in student.model.parameters() if p.requires_grad]

        def measure(cache: Path | None) -> list[dict[str, Any]]:
            teacher = base.teacher.model_copy(update={"cache": str(cache) if cache else None})
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # projection heads alike for every source
                distiller = Distiller(base.model_copy(update={"teacher": teacher}), student, train + val)
            out = []
            for i in range(0, len(train), args.batch):
                batch = student.build_batch(train[i : i + args.batch]).to(student.device)
                losses = distiller.objective(student.model, batch, unit_weights=True)
                per_signal = {}
                for name in distiller.signals:
                    grads = torch.autograd.grad(losses[name], params, retain_graph=True, allow_unused=True)
                    flat = torch.cat(
                        [
                            (g if g is not None else torch.zeros_like(p)).flatten()
                            for g, p in zip(grads, params, strict=True)
                        ]
                    )
                    per_signal[name] = (float(losses[name]), flat.double())
                out.append(per_signal)
            return out

        exact = measure(None)
        result: dict[str, Any] = {"samples": len(train), "batches": len(exact)}
        for storage, folder in caches.items():
            got = measure(folder)
            size = sum(f.stat().st_size for f in folder.glob("shard-*.safetensors"))
            samples = len(json.loads((folder / "manifest.json").read_text())["index"])
            row: dict[str, Any] = {"bytes_per_sample": size / samples}
            for name in exact[0]:
                errors, cosines = [], []
                for e, g in zip(exact, got, strict=True):
                    (le, ge), (lg, gg) = e[name], g[name]
                    errors.append(abs(lg - le) / max(abs(le), 1e-30))
                    cosines.append(float(torch.nn.functional.cosine_similarity(ge, gg, dim=0)))
                row[name] = {"loss_rel_error_max": max(errors), "grad_cosine_min": min(cosines)}
            result[storage] = row
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
