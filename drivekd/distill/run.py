"""`drivekd distill`: the SFT loop with a Distiller as objective and backward."""

from __future__ import annotations

from pathlib import Path

import torch

from drivekd.data.choices import shuffle_choices
from drivekd.distill.engine import Distiller, check_recipe
from drivekd.errors import DriveKDError
from drivekd.train.config import DistillConfig, dump_config
from drivekd.train.sft import check_resumable, load_model, load_training_data
from drivekd.train.trainer import Trainer


def run_distill(config: DistillConfig, *, resume: bool = False) -> Path:
    check_recipe(config)  # before any model, data or folder is touched
    check_resumable(config.train.output_dir, resume)
    torch.manual_seed(config.train.seed)
    if config.data.shuffle_choices and config.cache:
        raise DriveKDError(
            f"data.shuffle_choices with cache {config.cache}: cached teacher maps belong to the original option "
            "order (drop the cache to distil from the live teacher, or turn shuffling off)"
        )
    student = load_model(config.model)
    train, val, stats = load_training_data(config.data, student)
    distiller = Distiller(config, student, train + val)
    trainer = Trainer(
        config.train,
        student,
        train,
        val,
        distiller.objective,
        backward=distiller.backward,
        max_length=config.data.max_length,
        extra_modules=distiller.projections,
        before_step=distiller.before_step,
        augment=shuffle_choices if config.data.shuffle_choices else None,
        val_objective=distiller.validation_objective,
        stateful=distiller,
    )
    distiller.step_of = lambda: trainer.position.step
    return trainer.run(dump_config(config), stats, resume=resume)


def run_cache_teacher(config: DistillConfig, out: Path | None = None) -> Path:
    """Write the teacher targets of the run's train and val samples; returns the cache folder."""
    import click

    from drivekd.distill.cache import estimate_bytes, write_cache

    target = Path(out or config.cache or Path(config.train.output_dir) / "teacher-cache")
    check_recipe(config)
    student = load_model(config.model)
    train, val, _ = load_training_data(config.data, student)
    samples = train + val
    distiller = Distiller(config.model_copy(update={"cache": None}), student, samples)
    if not distiller.signals:
        raise DriveKDError(f"recipe {config.recipe!r} has no teacher signals: nothing to cache")
    per_image = {}
    lengths, visual = [], []
    for s in samples:
        lengths.append(student.token_lengths(s))
        count = 0
        for ref in s.images:
            from PIL import Image

            with Image.open(ref.path) as im:
                size = im.size
            per_image.setdefault(size, student.visual_token_count(*size))
            count += per_image[size]
        visual.append(count)
    layers = {n: distiller.teacher_layers(n) for n in distiller.names}
    widths = {n: distiller._teacher_width(n) for n in distiller.names}
    size = estimate_bytes(
        distiller.signals,
        lengths,
        visual,
        student.num_layers,
        layers,
        widths,
        student.model.config.text_config.vocab_size,
    )
    click.echo(
        f"teacher cache for {len(samples)} samples, signals {', '.join(distiller.names)}: about {size / 2**20:.1f} MiB (fp16) -> {target}"
    )
    write_cache(distiller, samples, target, batch_size=config.train.micro_batch_size)
    return target
