"""What storing each frame's prefix once and running it once saves: a teacher cache of a config's data
written with prefix sharing and reuse and without either, bytes and teacher seconds per question of
each, and how many questions shared their frame's prefix (the others keep their whole targets).

    python experiments/cache_prefix.py --config runs/quick/runs/multi-agp/seed-0/config.yaml [--storage fp16]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="a distill config (its teacher is run live)")
    parser.add_argument("--storage", default="fp16", choices=["fp16", "fp8"])
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = parser.parse_args(argv)

    from drivekd.bench.cache import cache_figures
    from drivekd.distill.run import run_cache_teacher
    from drivekd.train.config import DistillConfig, load_config

    config = load_config(DistillConfig, args.config, [*args.overrides, "teacher.cache=null"])
    result: dict[str, Any] = {"storage": args.storage}
    with tempfile.TemporaryDirectory() as tmp:
        for share in (True, False):
            start = time.perf_counter()
            # today's layout without sharing is also today's teacher work: every question run whole
            folder = run_cache_teacher(
                config,
                Path(tmp) / str(share),
                storage=args.storage,
                share_prefixes=share,
                reuse_prefix=share,
                echo=lambda _: None,
            )
            result["shared" if share else "unshared"] = cache_figures(folder) | {"seconds": time.perf_counter() - start}
    result["ratio"] = result["shared"]["bytes_per_question"] / result["unshared"]["bytes_per_question"]
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
