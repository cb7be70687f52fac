"""`drivekd bench cache`: what the teacher cache costs per question, in bytes and teacher seconds.

A synthetic driving dataset (FRAMES frames of N random camera images, Q questions of different
lengths about each, DriveSim-style prompts) and the drive-kd recipe's cache written three ways by the
same loaded teacher: as `cache-teacher` writes it (each frame's prefix run once and stored once,
zstd-compressed), as it did before (every question run whole and stored whole, uncompressed), and with
the lossy fp8 storage (compressed). Bytes are the shard files' per question (and the values' before
compression); teacher seconds are the teacher's forward passes per question. Each
lossy storage's signal losses and gradients are compared with the live teacher's exact targets on
the first questions (`lossy_errors`, shared with experiments/cache_lossy.py).

Pairs: the shipped DriveSim InternVL teacher and student base (trained weights: their maps are not
flat, so a lossy error means something), or the tiny Qwen2.5-VL presets; `real`: the published
shapes with random weights (InternVL3-1B student, -2B teacher; Qwen2.5-VL-3B, -7B), for a GPU.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# (student, teacher) per pair and size
TINY_PAIRS = {
    "internvl": ("drivesim-internvl-student-base", "drivesim-internvl-teacher"),
    "qwen": ("tiny-qwen25vl-student", "tiny-qwen25vl-teacher"),
}
REAL_PAIRS = {"internvl": ("internvl3-1b", "internvl3-2b"), "qwen": ("qwen2.5-vl-3b", "qwen2.5-vl-7b")}
LOSSY_STORAGES = ("fp8",)
RECIPE = "drive-kd"
# DriveSim-style questions of different lengths; {c} is a camera's name
QUESTIONS = (
    ("perception", "How many vehicles are visible in {c}?", "Count: 2 vehicles visible in {c}.\nFinal: {{2}}"),
    (
        "perception",
        "Where is the nearest vehicle ahead of the ego vehicle in {c}? Please select the correct answer from the "
        "following options: A. In the left lane, 20-50 m ahead. B. In the same lane, under 20 m ahead. C. In the "
        "right lane, under 20 m ahead. D. In the same lane, 20-50 m ahead.",
        "Final: {{D. In the same lane, 20-50 m ahead.}}",
    ),
    ("reasoning", "Will the vehicle ahead in {c} slow down?", "It keeps its distance.\nFinal: {{No}}"),
    (
        "reasoning",
        "What is the moving status of the closest vehicle in {c}? Please select the correct answer from the "
        "following options: A. Going ahead. B. Turning left. C. Turning right. D. Stopped.",
        "Final: {{A. Going ahead.}}",
    ),
    (
        "planning",
        "You are driving. Which action is safest for the ego vehicle now?\nA. Keep the lane at the current speed\n"
        "B. Change to the left lane\nC. Brake hard\nD. Change to the right lane",
        "Final: {{A. Keep the lane at the current speed}}",
    ),
    ("planning", "Is it safe to change to the left lane, judging from {c}?", "Final: {{Yes}}"),
)


def make_frames(out: Path, frames: int, cameras: int, questions: int, side: int) -> Path:
    """A native dataset (train.jsonl and images/) of `frames` frames of `cameras` random images of
    `side` pixels, with `questions` questions about each (`QUESTIONS` in turn, about each camera in turn)."""
    import numpy as np
    from PIL import Image

    from drivekd.data.formats import write_jsonl
    from drivekd.data.sample import IMAGE_PLACEHOLDER, ImageRef, Sample

    out = out.resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for f in range(frames):
        images = []
        for c in range(cameras):
            path = out / "images" / f"frame{f}_cam{c}.png"
            Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)).save(path)
            images.append(ImageRef(f"CAM_{c}", str(path)))
        header = "".join(f"{ref.camera}: {IMAGE_PLACEHOLDER}\n" for ref in images)
        for q in range(questions):
            capability, question, answer = QUESTIONS[q % len(QUESTIONS)]
            camera = images[q % cameras].camera
            samples.append(
                Sample(
                    f"frame{f}-q{q:03d}",
                    capability,
                    f"bench_{q % len(QUESTIONS)}",
                    images,
                    header + question.format(c=camera),
                    answer.format(c=camera),
                    f"frame{f}",
                )
            )
    write_jsonl(samples, out / "train.jsonl")
    return out


@dataclass
class Synthetic:
    """A pair loaded on `make_frames`' data with the drive-kd recipe: what `bench cache` and the cache
    experiments measure on."""

    names: tuple[str, str]  # (student, teacher) as the pair names them
    config: Any  # the DistillConfig
    signals: dict[str, Any]
    student: Any
    samples: list[Any]
    teacher_of: dict[str, str]
    teachers: Any  # LiveTeachers


def load_synthetic(
    pair: str,
    *,
    real: bool,
    cameras: int,
    questions_per_frame: int,
    frames: int,
    batch: int,
    tmp: Path,
    models: Path,
    device: str = "cpu",
    echo: Any = print,
) -> Synthetic:
    """The pair (`real`: the published shapes with random weights, initialised into `models/NAME` once
    and kept there) with its live teacher, on `frames` synthetic frames written under `tmp`."""
    from drivekd.distill.run import check_recipe
    from drivekd.distill.teachers import LiveTeachers
    from drivekd.models.loading import LoadOptions, init_like, real_shapes
    from drivekd.train.config import DataConfig, DistillConfig, ModelConfig, TrainConfig
    from drivekd.train.sft import load_model, load_training_data

    names = (REAL_PAIRS if real else TINY_PAIRS)[pair]
    if real:
        specs = []
        for name in names:  # bf16 on disk
            folder = models / name
            if not (folder / "config.json").is_file():
                echo(f"[cache] initialising {name} (random weights) in {folder}")
                init_like(name, folder, LoadOptions(dtype="bfloat16", seed=0))
            specs.append(str(folder))
        side = int(real_shapes()[names[0]]["vision"].get("image", 448))
    else:
        specs, side = list(names), 96
    data = make_frames(tmp / "data", frames, cameras, questions_per_frame, side)
    config = DistillConfig(
        model=ModelConfig(name=specs[0], freeze_vision=True),
        teacher={"name": specs[1], "dtype": "bfloat16" if device.startswith("cuda") else "float32"},
        recipe=RECIPE,
        data=DataConfig(path=str(data), val_split=None, max_length=32768),
        train=TrainConfig(output_dir=str(tmp / "run"), micro_batch_size=batch),
    )
    signals = check_recipe(config)
    student = load_model(config.model, device=device)
    train, val, _ = load_training_data(config.data, student)
    samples = train + val
    teacher_of = {n: str(config.teacher.of(n)) for n in signals}
    teachers = LiveTeachers(signals, teacher_of, student, dtype=config.teacher.dtype, probe=samples)
    return Synthetic(names, config, signals, student, samples, teacher_of, teachers)


def cache_figures(folder: Path) -> dict[str, Any]:
    """A written cache's size and cost: questions, bytes per question (the shard files, and the values
    before compression), questions sharing their frame's stored prefix, frames, teacher seconds (per
    question too)."""
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    questions = len(manifest["index"])
    size = sum(f.stat().st_size for f in folder.glob("shard-*.safetensors"))
    return {
        "questions": questions,
        "bytes_per_question": size / questions,
        "bytes_per_question_uncompressed": uncompressed_bytes(folder) / questions,
        "compression": manifest["compression"],
        "questions_sharing": len(manifest["prefixes"]),
        "frames": len({v[0] for v in manifest["prefixes"].values()}),
        "questions_after_prefix": manifest["after_prefix"],
        "teacher_seconds": manifest["teacher_seconds"],
        "teacher_seconds_per_question": manifest["teacher_seconds"] / questions,
    }


def uncompressed_bytes(folder: Path) -> int:
    """The bytes of a cache's stored tensors as they were before compression (a compressed value tensor
    counted by its recorded shape)."""
    from safetensors import safe_open

    from drivekd.distill.cache import BYTES_PER_VALUE, ITEM_BYTES

    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    per_value = BYTES_PER_VALUE[manifest["storage"]]
    total = 0
    for shard in folder.glob("shard-*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            keys = set(f.keys())
            for key in keys:
                if key.endswith("#shape"):
                    total += math.prod(f.get_tensor(key).tolist()) * per_value
                elif f"{key}#shape" not in keys:  # stored as it is
                    tensor = f.get_slice(key)
                    total += math.prod(tensor.get_shape()) * ITEM_BYTES[tensor.get_dtype()]
    return total


def lossy_errors(
    config: Any, student: Any, samples: Sequence[Any], caches: dict[str, Path | None], batch: int, questions: int
) -> dict[str, dict[str, Any]]:
    """Per cache (None: the live teacher, the exact targets' source, measured first), each signal's
    loss at weight 1 and its gradient over the student's trainable parameters on the first
    `questions` samples in batches of `batch`, against the exact ones: the largest relative error of
    the loss and the smallest gradient cosine over the batches (and over signals, at the top level)."""
    from drivekd.distill.engine import Distiller

    params = [p for p in student.model.parameters() if p.requires_grad]
    chosen = list(samples[:questions])

    def measure(cache: Path | None) -> list[dict[str, tuple[float, torch.Tensor]]]:
        teacher = config.teacher.model_copy(update={"cache": str(cache) if cache else None})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # projection heads alike for every source
            distiller = Distiller(config.model_copy(update={"teacher": teacher}), student, samples)
        out = []
        for i in range(0, len(chosen), batch):
            b = student.build_batch(chosen[i : i + batch]).to(student.device)
            losses = distiller.objective(student.model, b, unit_weights=True)
            per_signal = {}
            for name in distiller.signals:
                grads = torch.autograd.grad(losses[name], params, retain_graph=True, allow_unused=True)
                flat = torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).flatten()
                        for g, p in zip(grads, params, strict=True)
                    ]
                )
                # kept in host memory: at real shapes each is gigabytes, one per signal and batch
                per_signal[name] = (float(losses[name].detach()), flat.float().cpu())
            out.append(per_signal)
            del losses
        return out

    exact = measure(None)
    result: dict[str, dict[str, Any]] = {}
    for storage, folder in caches.items():
        if folder is None:
            continue
        got = measure(folder)
        row: dict[str, Any] = {"signals": {}}
        for name in exact[0]:
            errors, cosines = [], []
            for e, g in zip(exact, got, strict=True):
                (le, ge), (lg, gg) = e[name], g[name]
                errors.append(abs(lg - le) / max(abs(le), 1e-30))
                cosines.append(float(torch.nn.functional.cosine_similarity(ge.double(), gg.double(), dim=0)))
            row["signals"][name] = {"loss_rel_error": max(errors), "grad_cosine": min(cosines)}
        row["loss_rel_error"] = max(s["loss_rel_error"] for s in row["signals"].values())
        row["grad_cosine"] = min(s["grad_cosine"] for s in row["signals"].values())
        result[storage] = row
    return result


def _reuse_difference(a: Path, b: Path) -> dict[str, float]:
    """The largest difference between two caches' targets (read back as the losses read them): the
    prefix reuse's against the whole forward's, absolute and as a fraction of the target's largest value."""
    from safetensors import safe_open

    from drivekd.distill.cache import TeacherCache

    ca, cb = TeacherCache(a), TeacherCache(b)
    keys: set[str] = set()  # "<signal>/<k>" of every stored target
    for shard in b.glob("shard-*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            keys |= {k.split("/", 1)[1].split("#")[0] for k in f.keys() if not k.startswith("prefix:")}
    worst_abs = worst_rel = 0.0
    for sample_id in cb.manifest["index"]:
        for key in sorted(keys):
            x, y = ca.tensors(sample_id, key).float(), cb.tensors(sample_id, key).float()
            d = float((x - y).abs().max())
            worst_abs = max(worst_abs, d)
            worst_rel = max(worst_rel, d / max(float(y.abs().max()), 1e-30))
    return {"max_abs": worst_abs, "max_rel": worst_rel}


def bench_cache(
    pair: str = "internvl",
    *,
    cameras: int = 2,
    questions_per_frame: int = 20,
    frames: int = 2,
    real: bool = False,
    device: str = "cpu",
    batch: int = 8,
    lossy_questions: int = 4,
    lossy_batch: int = 2,
    repeats: int = 1,
    work: Path | None = None,
    echo: Any = print,
) -> dict[str, Any]:
    """Write the pair's drive-kd cache of a synthetic dataset three ways and measure each (module doc);
    the timed ways `repeats` times each, keeping the fastest."""
    from drivekd.errors import DriveKDError

    pairs = REAL_PAIRS if real else TINY_PAIRS
    if pair not in pairs:
        raise DriveKDError(f"bench cache: unknown pair {pair!r} ({', '.join(pairs)})")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise DriveKDError(f"bench cache: device {device}: CUDA is not available")
    # The CPU's arithmetic on denormal floats (attention maps' tiny probabilities) is slow (the
    # shipped teacher's forward took twice as long here): timings would measure the data's values,
    # not the work (`bench scale` flushes them too); restored afterwards.
    flushed = torch.set_flush_denormal(True)
    try:
        return _bench_cache(
            pair,
            cameras,
            questions_per_frame,
            frames,
            real,
            device,
            batch,
            lossy_questions,
            lossy_batch,
            repeats,
            work,
            echo,
        )
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _bench_cache(
    pair: str,
    cameras: int,
    questions_per_frame: int,
    frames: int,
    real: bool,
    device: str,
    batch: int,
    lossy_questions: int,
    lossy_batch: int,
    repeats: int,
    work: Path | None,
    echo: Any,
) -> dict[str, Any]:
    from drivekd.distill.cache import Ranks, write_cache

    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="drivekd-bench-cache-") as tmp:
        root = (work or Path(tmp)).resolve()
        ranks = Ranks()
        loaded = load_synthetic(
            pair,
            real=real,
            cameras=cameras,
            questions_per_frame=questions_per_frame,
            frames=frames,
            batch=batch,
            tmp=Path(tmp),
            models=root / "models",
            device=device if cuda else ranks.device,
            echo=echo,
        )
        names, config, signals, student = loaded.names, loaded.config, loaded.signals, loaded.student
        samples, teacher_of, teachers = loaded.samples, loaded.teacher_of, loaded.teachers
        # first calls are slow (allocations, kernels): one whole batch before anything is timed
        teachers.targets(student.build_batch(samples[: min(batch, len(samples))]).to(student.device))
        one = student.build_batch(samples[:1])
        result: dict[str, Any] = {
            "pair": pair,
            "shapes": "real" if real else "tiny",
            "student": names[0],
            "teacher": names[1],
            "recipe": RECIPE,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "teacher_dtype": config.teacher.dtype,
            "cameras": cameras,
            "questions_per_frame": questions_per_frame,
            "frames": frames,
            "batch": batch,
            "tokens_per_question": sum(len(student.token_ids(s)) for s in samples) / len(samples),
            "visual_tokens_per_frame": int(one.visual_mask.sum()),
        }
        caches: dict[str, Path] = {}
        ways = {  # name: (storage, prefix run once and reused, prefix stored once, compression)
            "whole": ("fp16", False, False, "none"),  # the layout before prefix sharing and compression
            "reused": ("fp16", True, True, "zstd"),  # cache-teacher's defaults
            **{storage: (storage, True, True, "zstd") for storage in LOSSY_STORAGES},
        }
        figures: dict[str, dict[str, Any]] = {}
        # the timed ways in turn, `repeats` times, each keeping its fastest (a shared machine's load
        # comes and goes); the lossy ways once, for their bytes and targets
        order = [w for _ in range(repeats) for w in ("whole", "reused")] + list(LOSSY_STORAGES)
        for way in order:
            storage, reuse, share, compression = ways[way]
            echo(f"[cache] writing the {way} cache ({storage}, {compression}) ...")
            caches[way] = Path(tmp) / f"cache-{way}"
            start = time.perf_counter()
            write_cache(
                teachers,
                signals,
                teacher_of,
                samples,
                caches[way],
                batch_size=batch,
                ranks=ranks,
                echo=lambda _: None,
                storage=storage,
                share_prefixes=share,
                reuse_prefix=reuse,
                compression=compression,
            )
            got = cache_figures(caches[way]) | {"write_seconds": time.perf_counter() - start}
            if way not in figures or got["teacher_seconds"] < figures[way]["teacher_seconds"]:
                figures[way] = got
        reused, whole = figures["reused"], figures["whole"]
        result |= {
            "bytes_per_question": reused["bytes_per_question"],
            "bytes_per_question_uncompressed": reused["bytes_per_question_uncompressed"],
            "bytes_per_question_unshared": whole["bytes_per_question"],
            "teacher_seconds_per_question": reused["teacher_seconds_per_question"],
            "teacher_seconds_per_question_without_reuse": whole["teacher_seconds_per_question"],
            "questions_after_prefix": reused["questions_after_prefix"],
        }
        result["bytes_ratio"] = result["bytes_per_question"] / result["bytes_per_question_unshared"]
        result["teacher_seconds_ratio"] = (
            result["teacher_seconds_per_question"] / result["teacher_seconds_per_question_without_reuse"]
        )
        result["reuse_target_difference"] = _reuse_difference(caches["reused"], caches["whole"])
        del teachers  # the lossy comparison loads its own live teacher
        echo(f"[cache] lossy storage: losses and gradients against the live teacher on {lossy_questions} questions ...")
        errors = lossy_errors(
            config,
            student,
            samples,
            {"fp16": caches["reused"], **{s: caches[s] for s in LOSSY_STORAGES}},
            lossy_batch,
            lossy_questions,
        )
        result["fp16_against_exact"] = errors["fp16"]
        result["lossy"] = {
            s: {
                "bytes_per_question": figures[s]["bytes_per_question"],
                "bytes_per_question_uncompressed": figures[s]["bytes_per_question_uncompressed"],
                **errors[s],
            }
            for s in LOSSY_STORAGES
        }
        result["caches"] = figures
        result["lossy_questions"] = min(lossy_questions, len(samples))
        result["repeats"] = repeats
        result["machine"] = _machine()
    return result


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU threads, torch {torch.__version__}"
