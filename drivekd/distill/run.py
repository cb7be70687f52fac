"""`drivekd distill`: the SFT loop with a Distiller as objective and backward."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from drivekd.data.choices import shuffle_choices
from drivekd.distill.calibrate import calibrate_run
from drivekd.distill.engine import Distiller
from drivekd.distill.recipe import check_recipe
from drivekd.errors import DriveKDError
from drivekd.train.config import DistillConfig, dump_config
from drivekd.train.order import calibration_sample
from drivekd.train.run_folder import RunFolder, run_identity, samples_digest
from drivekd.train.sft import load_model, load_training_data
from drivekd.train.trainer import Trainer


def run_distill(config: DistillConfig, *, resume: bool = False, distiller_class: type[Distiller] = Distiller) -> Path:
    """Train a distillation run. `distiller_class` is the objective: `Distiller`, or a subclass with
    its own config (as in `drivekd.experimental`)."""
    signals = check_recipe(config)  # before any model, data or folder is touched
    folder = RunFolder(config.train.output_dir)
    identity = run_identity(config, recipe={n: s.recipe_entry() for n, s in signals.items()})
    if not folder.check(identity, resume=resume):
        return folder.path / "final"  # finished, and nothing to add
    torch.manual_seed(config.train.seed)
    student = load_model(config.model)
    train, val, stats = load_training_data(config.data, student)
    identity["named.data"] = samples_digest([*train, *val])
    folder.check_data(identity["named.data"], resume=resume)
    distiller = distiller_class(config, student, train + val)
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
        prefetch=distiller.teachers.prefetch,
    )
    main = trainer.accelerator.is_main_process
    # measured on the student as the trainer placed it (its device), before any step or resume
    calibration = calibrate_run(
        distiller,
        calibration_sample(train, config.train, config.calibration_batches),
        folder.path,
        resume=resume,
        batches=config.calibration_batches,
        batch_size=config.train.micro_batch_size,
        write=main,
    )
    header = {f"loss_weight/{n}": w for n, w in calibration["weights"].items()}
    header |= {f"share/{n}": v for n, v in calibration["shares"].items()}
    return trainer.run(
        dump_config(config), stats, resume=resume, header=header, on_start=lambda: folder.record(identity)
    )


def run_cache_teacher(
    config: DistillConfig,
    out: Path | None = None,
    *,
    echo: Callable[[str], None] = print,
    shard_samples: int | None = None,
    storage: str = "fp16",
    share_prefixes: bool = True,
    reuse_prefix: bool = True,
    compression: str = "zstd",
) -> Path:
    """Write the teacher targets of the run's train and val samples; returns the cache folder. Under
    `torchrun` the processes split the shards between them, each on its own device."""
    from drivekd.distill.cache import SHARD_SAMPLES, Ranks, estimate_bytes, write_cache
    from drivekd.distill.teachers import LiveTeachers

    target = Path(out or config.teacher.cache or Path(config.train.output_dir) / "teacher-cache")
    signals = check_recipe(config)
    if not signals:
        raise DriveKDError(f"recipe {config.recipe!r} has no teacher signals: nothing to cache")
    ranks = Ranks()
    say = echo if ranks.rank == 0 else (lambda _: None)
    student = load_model(config.model, device=ranks.device)
    train, val, _ = load_training_data(config.data, student)
    samples = train + val
    teacher_of = {n: str(config.teacher.of(n)) for n in signals}
    teachers = LiveTeachers(
        signals, teacher_of, student, dtype=config.teacher.dtype, probe=samples, placement=config.teacher.placement()
    )
    lengths = [student.token_lengths(s) for s in samples]
    visual = [sum(student.visual_tokens(s)) for s in samples]
    widths = {n: teachers.width(n) for n in signals}
    size = estimate_bytes(teachers.bound, lengths, visual, widths, student.vocab_size, storage)
    if share_prefixes:  # each frame's prefix (at least its visual tokens) once for its questions
        frames = len({tuple(im.path for im in s.images) for s in samples})
        whole = size
        size = estimate_bytes(
            teachers.bound,
            lengths,
            visual,
            widths,
            student.vocab_size,
            storage,
            prefixes=visual,
            questions_per_frame=len(samples) / max(frames, 1),
        )
        say(
            f"{len(samples)} questions about {frames} frames: each frame's prefix stored once ({whole / 2**20:.1f} MiB without)"
        )
    say(
        f"teacher cache for {len(samples)} samples, signals {', '.join(signals)}: about {size / 2**20:.1f} MiB "
        f"({storage}{', before zstd' if compression == 'zstd' else ''}) -> {target}"
        + (f", written by {ranks.world_size} processes" if ranks.world_size > 1 else "")
    )
    manifest = write_cache(
        teachers,
        signals,
        teacher_of,
        samples,
        target,
        batch_size=config.train.micro_batch_size,
        shard_samples=shard_samples or SHARD_SAMPLES,
        ranks=ranks,
        echo=say,
        storage=storage,
        share_prefixes=share_prefixes,
        reuse_prefix=reuse_prefix,
        compression=compression,
    )
    if ranks.rank == 0:
        written = sum(f.stat().st_size for f in target.glob("shard-*.safetensors"))
        say(f"written: {written / 2**20:.1f} MiB ({written / max(len(samples), 1) / 2**20:.3f} MiB a question)")
    say(
        f"teacher forward passes: {manifest['teacher_seconds']:.1f} s; {manifest['after_prefix']} of {len(samples)} "
        "questions ran after their frame's prefix (its KV cache)"
    )
    return target
