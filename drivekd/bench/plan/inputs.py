"""What a plan is asked for: an SFT or distillation config (told apart by its fields), what the data
says of images per sample and their size, and the command line's inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from drivekd.bench.plan.model import DEFAULT_IMAGE
from drivekd.errors import DriveKDError


def load_any_config(path: Path, overrides: tuple[str, ...] = ()) -> BaseModel:
    """An SFT or a distillation config, told apart by its fields (a `teacher`, `recipe`, ... key)."""
    from drivekd.train.config import DistillConfig, SFTConfig, load_config

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return load_config(SFTConfig, path, overrides)  # raises its one-line error
    keys = set(raw) if isinstance(raw, dict) else set()
    keys |= {o.split("=", 1)[0].split(".")[0] for o in overrides}
    distill_only = set(DistillConfig.model_fields) - set(SFTConfig.model_fields)
    return load_config(DistillConfig if keys & distill_only else SFTConfig, path, overrides)


def peek_data(data: Any) -> tuple[int, tuple[int, int]] | None:
    """The most images per sample among the first training samples and the first image's size; None
    when the data cannot be read here (a cluster path, say)."""
    from PIL import Image

    from drivekd.data.formats import load_samples, load_split

    path = Path(data.path)
    try:
        if path.is_dir():
            samples = load_split(path, data.train_split, data.image_roots)
        else:
            samples = load_samples(path, data.format, data.image_roots)
    except (DriveKDError, OSError, ValueError):
        return None
    samples = [s for s in samples[:256] if s.images]
    if not samples:
        return None
    try:
        with Image.open(samples[0].images[0].path) as im:
            size = im.size
    except OSError:
        size = DEFAULT_IMAGE
    return max(len(s.images) for s in samples), size


def count_samples(data: Any) -> tuple[int, int] | None:
    """The training and validation samples a teacher cache of this data holds, and their frames (the
    distinct image sets their questions are about); None when the data cannot be read here. The
    config's `capability`, `limit` and `mix` are not applied: the counts are the files'."""
    from drivekd.data.formats import load_samples, load_split

    path = Path(data.path)
    samples = []
    try:
        if path.is_dir():
            samples += load_split(path, data.train_split, data.image_roots)
            if data.val_split and (path / f"{data.val_split}.jsonl").is_file():
                samples += load_split(path, data.val_split, data.image_roots)
        else:
            samples = load_samples(path, data.format, data.image_roots)
    except (DriveKDError, OSError, ValueError):
        return None
    return len(samples), len({tuple(im.path for im in s.images) for s in samples})


@dataclass(frozen=True)
class Inputs:
    """What the plan is asked for, beyond the config."""

    tokens: int | None = None  # None: data.max_length
    answer_tokens: int | None = None  # the longest answer; None: every text token (an upper bound)
    images: int | None = None  # None: read from the data, else 1
    gpus: int = 1
    device: str = "cuda"  # "cpu": the CPU optimiser path and RAM budget (calibration)
    device_memory_gb: float = 80.0
    image: tuple[int, int] | None = None  # (width, height); None: read from the data
    padded: bool | None = None  # the batch holds padding (a mask reaches SDPA); None: when micro batch > 1
    questions_per_frame: float | None = None  # of a teacher cache with shared prefixes; None: from the data
