"""The teacher's seconds per question with each frame's prefix run once, against every question run
whole, on one frame of `drivekd bench cache`'s synthetic questions: the prefix once, the questions in
batches after its KV cache, and the first `--whole` questions run whole (what the rest would cost is
taken as their mean: at the published shapes on a CPU a whole question takes a minute or more).

    python experiments/prefix_reuse_time.py --cameras 6 --questions-per-frame 20
    python experiments/prefix_reuse_time.py --real-shapes --cameras 6 --questions-per-frame 20 --whole 2 \\
        --work runs/real-models

Prints one JSON object; `ratio` is reused over whole seconds per question.
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
    parser.add_argument("--pair", default="internvl")
    parser.add_argument("--cameras", type=int, default=6)
    parser.add_argument("--questions-per-frame", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--whole", type=int, default=8, help="questions run whole (one at a time)")
    parser.add_argument("--real-shapes", action="store_true", help="the published shapes, random weights")
    parser.add_argument("--work", type=Path, default=None, help="where --real-shapes keeps its models")
    args = parser.parse_args(argv)

    import torch

    from drivekd.bench.cache import load_synthetic
    from drivekd.distill.cache import frame_prefix

    torch.set_flush_denormal(True)  # as `bench cache`: denormal maps would time the values, not the work
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        loaded = load_synthetic(
            args.pair,
            real=args.real_shapes,
            cameras=args.cameras,
            questions_per_frame=args.questions_per_frame,
            frames=1,
            batch=args.batch,
            tmp=root,
            models=(args.work or root).resolve(),
        )
        names, student, samples, teachers = loaded.names, loaded.student, loaded.samples, loaded.teachers

        def timed(fn: Any) -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        timed(lambda: teachers.targets(student.build_batch(samples[:1])))  # warm-up
        one = student.build_batch(samples[:1])
        _, rows, _ = frame_prefix(one.inputs["input_ids"][0], one.visual_mask[0], [])
        box: dict[str, Any] = {}
        prefix_s = timed(lambda: box.update(prefix=teachers.run_prefix(one, rows)))
        after = [
            timed(lambda i=i: teachers.targets(student.build_batch(samples[i : i + args.batch]), box["prefix"]))
            for i in range(0, len(samples), args.batch)
        ]
        whole = [
            timed(lambda i=i: teachers.targets(student.build_batch(samples[i : i + 1]))) for i in range(args.whole)
        ]
        reused = (prefix_s + sum(after)) / len(samples)
        result = {
            "pair": names,
            "shapes": "real" if args.real_shapes else "tiny",
            "cameras": args.cameras,
            "questions_per_frame": len(samples),
            "prefix_tokens": rows,
            "tokens_per_question": sum(len(student.token_ids(s)) for s in samples) / len(samples),
            "prefix_seconds": prefix_s,
            "after_prefix_batch_seconds": after,
            "whole_question_seconds": whole,
            "reused_seconds_per_question": reused,
            "whole_seconds_per_question": sum(whole) / len(whole),
            "ratio": reused / (sum(whole) / len(whole)),
            "threads": torch.get_num_threads(),
        }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
