"""Supervised fine-tuning: cross-entropy on answer tokens. This is also how tiny teachers are born."""

from __future__ import annotations

from pathlib import Path

import torch

from drivekd.data.formats import load_samples, load_split
from drivekd.data.sample import Sample
from drivekd.data.validate import validate_samples
from drivekd.errors import DataError
from drivekd.models.backend import Batch, VLMBackend
from drivekd.models.loading import LoadOptions, load_backend
from drivekd.train.config import DataConfig, ModelConfig, SFTConfig, dump_config
from drivekd.train.trainer import Trainer


def load_model(cfg: ModelConfig, device: str = "cpu") -> VLMBackend:
    return load_backend(
        cfg.name,
        LoadOptions(
            dtype=cfg.dtype,
            device=device,
            attn_implementation=cfg.attn_implementation,
            freeze_vision=cfg.freeze_vision,
            freeze_projector=cfg.freeze_projector,
            freeze_llm=cfg.freeze_llm,
            lora=cfg.lora,
            seed=cfg.seed,
        ),
    )


def load_training_data(cfg: DataConfig, backend: VLMBackend) -> tuple[list[Sample], list[Sample], dict[str, int]]:
    """Train/val samples after the capability filter and the length policy; images checked up front."""
    path = Path(cfg.path)

    def read(split: str | None) -> list[Sample]:
        if split is None:
            return []
        if path.is_dir():
            return load_split(path, split, cfg.image_roots)
        return load_samples(path, cfg.format, cfg.image_roots) if split == cfg.train_split else []

    train, val = read(cfg.train_split), read(cfg.val_split)
    if cfg.capability:
        train = [s for s in train if s.capability == cfg.capability]
        val = [s for s in val if s.capability == cfg.capability]
    if cfg.limit is not None:
        train = train[: cfg.limit]
    if not train:
        raise DataError(f"{cfg.path}: no training samples (split {cfg.train_split!r}, capability {cfg.capability})")
    validate_samples(train + val).raise_if_bad(cfg.path)
    stats = {"train": len(train), "val": len(val), "skipped_overlong": 0}
    kept = []
    for s in train:
        n = backend.token_lengths(s)
        if n <= cfg.max_length:
            kept.append(s)
        elif cfg.on_overlong == "skip":
            stats["skipped_overlong"] += 1
        else:
            raise DataError(
                f"{cfg.path}: sample {s.id}: {n} tokens exceed data.max_length={cfg.max_length} "
                "(raise it, or set data.on_overlong=skip)"
            )
    val = [s for s in val if backend.token_lengths(s) <= cfg.max_length]
    stats["train"] = len(kept)
    return kept, val, stats


def cross_entropy(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    return {"ce": model(**batch.inputs, labels=batch.labels).loss}


def run_sft(config: SFTConfig, *, resume: bool = False) -> Path:
    torch.manual_seed(config.train.seed)
    backend = load_model(config.model)
    train, val, stats = load_training_data(config.data, backend)
    trainer = Trainer(config.train, backend, train, val, cross_entropy, max_length=config.data.max_length)
    return trainer.run(dump_config(config), stats, resume=resume)
