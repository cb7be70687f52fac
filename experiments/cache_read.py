"""How long a distillation step waits for its cached teacher targets, against the step itself.

Runs `drivekd distill` for a few steps with the config's teacher cache, counting the time the step
spent waiting on the cache (the next micro-batch's targets are read in a background thread while the
current one trains), and times reads outside training: one sample's targets read alone from the
memory-mapped shard, and a whole shard loaded (what a reader that loads shards has to do for one
sample it has not got).

    python experiments/cache_read.py --config runs/quick/runs/multi-agp/seed-0/config.yaml --steps 30

Prints one JSON object. The shards are read through the page cache as they are (just written, they
are usually in memory): the figures are the code's cost, not a cold disk's.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="a distill config with teacher.cache")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reads", type=int, default=64, help="samples timed for the read alone")
    args = parser.parse_args(argv)

    from safetensors.torch import load_file

    from drivekd.distill.run import run_distill
    from drivekd.distill.teachers import CachedTeachers
    from drivekd.train.config import DistillConfig, load_config
    from drivekd.train.trainer import Trainer

    seen: list[CachedTeachers] = []
    original = CachedTeachers.__init__

    def remember(self: CachedTeachers, *a: object, **kw: object) -> None:
        original(self, *a, **kw)  # type: ignore[arg-type]
        seen.append(self)

    CachedTeachers.__init__ = remember  # type: ignore[method-assign]
    train = Trainer.train

    def counted(self: Trainer) -> dict[str, float]:
        seen[-1].waited_s, seen[-1].read_ahead = 0.0, 0  # the training steps', not the calibration's
        return train(self)

    Trainer.train = counted  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            DistillConfig,
            args.config,
            [
                f"train.output_dir={tmp}/run",
                f"train.max_steps={args.steps}",
                "train.log_every=1",
                "train.eval_every=null",
            ],
        )
        if not config.teacher.cache:
            raise SystemExit(f"{args.config}: no teacher.cache")
        start = time.perf_counter()
        run_distill(config)
        wall = time.perf_counter() - start
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    teachers = seen[-1]
    per_step = [config.train.micro_batch_size / r["samples_per_s"] for r in rows if "samples_per_s" in r]
    cache = teachers.cache
    ids = random.Random(0).sample(sorted(cache.manifest["index"]), min(args.reads, len(cache.manifest["index"])))
    start = time.perf_counter()
    for sample_id in ids:
        teachers._read(sample_id)
    per_sample = (time.perf_counter() - start) / len(ids)
    shard = cache.folder / cache.manifest["index"][ids[0]]
    start = time.perf_counter()
    load_file(str(shard))
    shard_load = time.perf_counter() - start
    result = {
        "steps": len(per_step),
        "step_s_median": sorted(per_step)[len(per_step) // 2],
        "wait_per_step_s": teachers.waited_s / max(len(per_step), 1),
        "read_ahead_samples": teachers.read_ahead,
        "read_one_sample_s": per_sample,
        "load_one_shard_s": shard_load,
        "shard_mib": shard.stat().st_size / 2**20,
        "run_wall_s": wall,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
