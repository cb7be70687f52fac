"""How much the cache's lossless zstd compression saves, per part of the stored targets, on a pair's
maps: the shipped DriveSim teacher's (trained) or the published shapes' (random weights).

Writes the drive-kd recipe's cache of `drivekd bench cache`'s synthetic frames once, uncompressed
fp16 with each frame's prefix stored once (the teacher runs once), then encodes every stored value
tensor the ways the cache writer can (fp16 and fp8, each with and without zstd, by the writer's own
`encode` and `compress`) and sums the bytes per question, split into the frames' prefix blocks and
the questions' own rows:

    python experiments/cache_compression.py --cameras 6 --questions-per-frame 20 --frames 2
    python experiments/cache_compression.py --real-shapes --cameras 6 --questions-per-frame 20 --frames 1 \\
        --work runs/real-models

fp8 here is encoded from the fp16 targets (the writer encodes the fp32 ones; the bytes differ in
rounding only). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default="internvl")
    parser.add_argument("--cameras", type=int, default=6)
    parser.add_argument("--questions-per-frame", type=int, default=20)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--real-shapes", action="store_true", help="the published shapes, random weights")
    parser.add_argument("--work", type=Path, default=None, help="where --real-shapes keeps its models")
    args = parser.parse_args(argv)

    import torch
    from safetensors import safe_open

    from drivekd.bench.cache import load_synthetic
    from drivekd.distill.cache import BYTES_PER_VALUE, Ranks, compress, encode, write_cache

    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        loaded = load_synthetic(
            args.pair,
            real=args.real_shapes,
            cameras=args.cameras,
            questions_per_frame=args.questions_per_frame,
            frames=args.frames,
            batch=args.batch,
            tmp=root,
            models=(args.work or root).resolve(),
        )
        names, student, samples = loaded.names, loaded.student, loaded.samples
        folder = root / "cache"
        write_cache(
            loaded.teachers,
            loaded.signals,
            loaded.teacher_of,
            samples,
            folder,
            args.batch,
            ranks=Ranks(),
            echo=print,
            compression="none",
        )
        ways = ("fp16", "fp16+zstd", "fp8", "fp8+zstd")
        parts: dict[str, dict[str, dict[str, int]]] = {}  # part -> signal -> way -> bytes
        for shard in sorted(folder.glob("shard-*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    value = f.get_tensor(key)
                    part = "prefix" if key.startswith("prefix:") else "question"
                    signal = key.split("/")[1]
                    row = parts.setdefault(part, {}).setdefault(signal, dict.fromkeys(ways, 0))
                    for storage in ("fp16", "fp8"):
                        stored = encode(value.float(), storage)
                        row[storage] += sum(t.numel() * t.element_size() for t in stored.values())
                        packed = compress({key + suffix: t for suffix, t in stored.items()})
                        row[f"{storage}+zstd"] += sum(t.numel() * t.element_size() for t in packed.values())
                    assert value.dtype == torch.float16 and BYTES_PER_VALUE["fp16"] == 2
        questions = len(samples)
        mib = {
            part: {s: {w: b / questions / 2**20 for w, b in row.items()} for s, row in rows.items()}
            for part, rows in parts.items()
        }
        total = {w: sum(row[w] for rows in parts.values() for row in rows.values()) / questions / 2**20 for w in ways}
        result = {
            "pair": names,
            "shapes": "real" if args.real_shapes else "tiny",
            "cameras": args.cameras,
            "questions_per_frame": args.questions_per_frame,
            "frames": args.frames,
            "tokens_per_question": sum(len(student.token_ids(s)) for s in samples) / questions,
            "mib_per_question": total,
            "ratio_to_fp16": {w: total[w] / total["fp16"] for w in ways},
            "mib_per_question_by_part": mib,
        }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
