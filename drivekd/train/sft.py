"""Supervised fine-tuning: cross-entropy on answer tokens. This is also how tiny teachers are born."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from drivekd.data.choices import shuffle_choices
from drivekd.data.formats import load_samples, load_split
from drivekd.data.sample import Sample
from drivekd.data.validate import validate_samples
from drivekd.errors import DataError
from drivekd.models.backend import IGNORE_INDEX, Batch, VLMBackend, answer_cross_entropy, answer_positions
from drivekd.models.loading import LoadOptions, load_backend
from drivekd.train.config import DataConfig, MixIn, ModelConfig, SFTConfig, dump_config
from drivekd.train.run_folder import RunFolder, run_identity, samples_digest
from drivekd.train.trainer import Objective, Trainer


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
    train = _read_split(Path(cfg.path), cfg.format, cfg.train_split, cfg)
    val = _read_split(Path(cfg.path), cfg.format, cfg.val_split, cfg)
    mixed = [s for mix in cfg.mix for s in _mix_in(mix, cfg)]
    if cfg.capability:
        train, val, mixed = ([s for s in part if s.capability == cfg.capability] for part in (train, val, mixed))
    if cfg.limit is not None:
        train = train[: cfg.limit]
    train = train + mixed
    if mixed and len({s.id for s in train}) < len(train):
        raise DataError(f"{cfg.path}: data.mix: two training sources share a folder name; their ids collide")
    if not train:
        raise DataError(f"{cfg.path}: no training samples (split {cfg.train_split!r}, capability {cfg.capability})")
    report = validate_samples(train + val)  # images decoded too: a broken one fails now, not at step 12
    report.raise_if_bad(cfg.path)
    if not val and cfg.val_split is not None:
        import click

        click.echo(
            f"warning: {cfg.path}: no validation split (a data file is all training data), so no val metrics; "
            "make one with `drivekd data split FILE DIR` and train on DIR",
            err=True,
        )
    stats = {"mixed_in": len(mixed), "duplicate_items": report.duplicate_items}
    kept = {}
    for split, samples in (("train", train), ("val", val)):
        kept[split] = []
        for s in samples:
            n = backend.token_lengths(s)
            if n <= cfg.max_length:
                kept[split].append(s)
            elif cfg.on_overlong == "error":
                raise DataError(
                    f"{cfg.path}: {split} sample {s.id}: {n} tokens exceed data.max_length={cfg.max_length} "
                    "(raise it, or set data.on_overlong=skip)"
                )
        stats[split] = len(kept[split])
        stats[f"skipped_overlong_{split}"] = len(samples) - len(kept[split])
    skipped = {k: v for k, v in stats.items() if k.startswith("skipped_overlong_") and v}
    if skipped:
        import click

        click.echo(
            f"warning: {cfg.path}: skipped samples longer than data.max_length={cfg.max_length} tokens: "
            + ", ".join(
                f"{v} of {v + stats[k.removeprefix('skipped_overlong_')]} {k.removeprefix('skipped_overlong_')}"
                for k, v in skipped.items()
            ),
            err=True,
        )
    return kept["train"], kept["val"], stats


def _read_split(path: Path, fmt: str | None, split: str | None, cfg: DataConfig) -> list[Sample]:
    """A native folder's split; a data file is all training data (no val from it)."""
    if split is None:
        return []
    if path.is_dir():
        return load_split(path, split, cfg.image_roots)
    return load_samples(path, fmt, cfg.image_roots) if split == cfg.train_split else []


def _mix_in(mix: MixIn, cfg: DataConfig) -> list[Sample]:
    path = Path(mix.path)
    samples = _read_split(path, mix.format, cfg.train_split, cfg)
    if mix.samples is not None:
        if mix.samples > len(samples):
            raise DataError(f"{mix.path}: data.mix asks for {mix.samples} samples, it holds {len(samples)}")
        samples = random.Random(mix.seed).sample(samples, mix.samples)
    # Generated datasets number their items alike (scene-00000-q00); ids key teacher caches.
    return [dataclasses.replace(s, id=f"{path.name}:{s.id}") for s in samples]


def cross_entropy(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    return {"ce": answer_cross_entropy(model, batch)[0]}


def answer_metrics(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Validation: plain answer CE, and `decision_acc`, the share of answers whose whole `Final: {...}`
    span is the argmax under teacher forcing (the letter is what scores; CE averages it away)."""
    ce, out = answer_cross_entropy(model, batch)
    metrics: dict[str, Any] = {"ce": ce}
    if batch.decision_mask is not None:
        spans = batch.decision_mask.any(1)  # answers without a span take no part, whatever their batch
        if bool(spans.any()):
            assert batch.labels is not None
            answer = answer_positions(batch.labels)  # the rows of `out.logits`, in order
            wrong = out.logits.argmax(-1) != batch.labels[:, 1:][answer[:, :-1]]
            misses = torch.zeros_like(answer)
            misses[answer] = wrong & batch.decision_mask[:, 1:][answer[:, :-1]]
            hits = ~misses.any(1)
            metrics["decision_acc"] = (hits[spans].float().mean(), int(spans.sum()))
    return metrics


def token_nll(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token NLL (B, T-1; 0 where the label is ignored) and the shifted labels."""
    logits = model(**batch.inputs).logits[:, :-1].float()
    labels = batch.labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(labels)
    return nll, labels


def run_sft(
    config: SFTConfig, *, resume: bool = False, objective: Callable[[VLMBackend], Objective] | None = None
) -> Path:
    """Train an SFT run. `objective` builds the training objective for the loaded model (a loss beside
    the CE, as in `drivekd.experimental`); None: the answer CE."""
    folder = RunFolder(config.train.output_dir)
    identity = run_identity(config)
    if not folder.check(identity, resume=resume):
        return folder.path / "final"  # finished, and nothing to add
    torch.manual_seed(config.train.seed)
    backend = load_model(config.model)
    train, val, stats = load_training_data(config.data, backend)
    identity["named.data"] = samples_digest([*train, *val])
    folder.check_data(identity["named.data"], resume=resume)
    augment = shuffle_choices if config.data.shuffle_choices else None
    trainer = Trainer(
        config.train,
        backend,
        train,
        val,
        cross_entropy if objective is None else objective(backend),
        max_length=config.data.max_length,
        augment=augment,
        val_objective=answer_metrics,
    )
    return trainer.run(dump_config(config), stats, resume=resume, on_start=lambda: folder.record(identity))
