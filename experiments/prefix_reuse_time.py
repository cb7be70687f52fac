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

    from drivekd.bench.cache import REAL_PAIRS, RECIPE, TINY_PAIRS, make_frames
    from drivekd.distill.cache import frame_prefix
    from drivekd.distill.run import check_recipe
    from drivekd.distill.teachers import LiveTeachers
    from drivekd.models.loading import LoadOptions, init_like, real_shapes
    from drivekd.train.config import DataConfig, DistillConfig, ModelConfig, TrainConfig
    from drivekd.train.sft import load_model, load_training_data

    torch.set_flush_denormal(True)  # as `bench cache`: denormal maps would time the values, not the work
    names = (REAL_PAIRS if args.real_shapes else TINY_PAIRS)[args.pair]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.real_shapes:
            work = (args.work or root).resolve()
            specs = []
            for name in names:
                if not (work / name / "config.json").is_file():
                    init_like(name, work / name, LoadOptions(dtype="bfloat16", seed=0))
                specs.append(str(work / name))
            side = int(real_shapes()[names[0]]["vision"].get("image", 448))
        else:
            specs, side = list(names), 96
        data = make_frames(root / "data", 1, args.cameras, args.questions_per_frame, side)
        config = DistillConfig(
            model=ModelConfig(name=specs[0], freeze_vision=True),
            teacher={"name": specs[1], "dtype": "float32"},
            recipe=RECIPE,
            data=DataConfig(path=str(data), val_split=None, max_length=32768),
            train=TrainConfig(output_dir=str(root / "run"), micro_batch_size=args.batch),
        )
        signals = check_recipe(config)
        student = load_model(config.model, device="cpu")
        train, val, _ = load_training_data(config.data, student)
        samples = train + val
        teacher_of = {n: str(config.teacher.of(n)) for n in signals}
        teachers = LiveTeachers(signals, teacher_of, student, dtype="float32", probe=samples)

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
        whole = [timed(lambda i=i: teachers.targets(student.build_batch(samples[i : i + 1]))) for i in range(args.whole)]
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
