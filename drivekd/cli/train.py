"""`drivekd sft`: supervised fine-tuning from a YAML config."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from drivekd.train.config import DistillConfig, SFTConfig, reference


@click.command(context_settings={"ignore_unknown_options": True}, epilog=reference(SFTConfig))
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help="Experiment YAML (see configs/)."
)
@click.option("--resume", is_flag=True, help="Continue from the run directory's last checkpoint.")
@click.argument("overrides", nargs=-1)
def sft(config_path: Path, resume: bool, overrides: tuple[str, ...]) -> None:
    """Fine-tune a VLM on answers (cross-entropy). OVERRIDES are KEY=VALUE, e.g. train.lr=1e-4."""
    from drivekd.train.sft import run_sft

    train_from_config(SFTConfig, run_sft, config_path, overrides, resume)


@click.command(context_settings={"ignore_unknown_options": True}, epilog=reference(DistillConfig))
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help="Distillation YAML (see configs/)."
)
@click.option("--resume", is_flag=True, help="Continue from the run directory's last checkpoint.")
@click.argument("overrides", nargs=-1)
def distill(config_path: Path, resume: bool, overrides: tuple[str, ...]) -> None:
    """Distil teachers into a student: CE plus the recipe's signals, combined by the gradient strategy."""
    from drivekd.distill.run import run_distill

    train_from_config(DistillConfig, run_distill, config_path, overrides, resume)


@click.command(name="cache-teacher", context_settings={"ignore_unknown_options": True}, epilog=reference(DistillConfig))
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True, help="The distillation YAML.")
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Cache folder (default: the config's `teacher.cache`)."
)
@click.option(
    "--shard-samples",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per shard file (default 256; a frame's questions stay in one shard): the unit a killed run "
    "redoes and that processes split.",
)
@click.option(
    "--storage",
    type=click.Choice(["fp16", "fp8"]),
    default="fp16",
    show_default=True,
    help="fp8: float8 values scaled row by row, about half the bytes, lossy (its measured error: docs/results.md).",
)
@click.option(
    "--compression",
    type=click.Choice(["zstd", "none"]),
    default="zstd",
    show_default=True,
    help="zstd: the stored values' bytes compressed, lossless (about a third smaller in fp16, half in fp8 on the "
    "shipped teacher's maps); none: as they are, read without decompressing.",
)
@click.option(
    "--prefix-reuse/--no-prefix-reuse",
    default=True,
    show_default=True,
    help="Run each frame's prefix (preamble and images) once and its questions after its KV cache (the "
    "targets equal the whole forward's up to the teacher dtype's rounding: measured within 1e-5 of the largest "
    "value in fp32); --no-prefix-reuse runs every question whole.",
)
@click.argument("overrides", nargs=-1)
def cache_teacher(
    config_path: Path,
    out: Path | None,
    shard_samples: int | None,
    storage: str,
    compression: str,
    prefix_reuse: bool,
    overrides: tuple[str, ...],
) -> None:
    """Run the teachers once and store the recipe's targets (safetensors shards); `distill` with
    `teacher.cache=DIR` then loads no teacher. Run it again after a kill to finish it; under
    `torchrun --nproc-per-node N -m drivekd cache-teacher ...` N processes write it together."""
    from drivekd.distill.run import run_cache_teacher
    from drivekd.train.config import load_config

    config = load_config(DistillConfig, config_path, overrides)
    target = run_cache_teacher(
        config,
        out,
        echo=click.echo,
        shard_samples=shard_samples,
        storage=storage,
        reuse_prefix=prefix_reuse,
        compression=compression,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"wrote {target}")


@click.group()
def config() -> None:
    """Configuration reference."""


@config.command()
@click.argument("kind", type=click.Choice(["sft", "distill"]))
def show(kind: str) -> None:
    """Every field of an `sft` or `distill` config: default, type and what it does."""
    click.echo(reference(SFTConfig if kind == "sft" else DistillConfig).removeprefix("\b\n"))


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True, help="The distillation YAML.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Where the calibrated recipe YAML goes.")
@click.option(
    "--share",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Every signal's initial loss as this share of CE (default: each signal's own `share`, else 0.1).",
)
@click.option(
    "--batches",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Training batches the losses are averaged over.",
)
@click.argument("overrides", nargs=-1)
def calibrate(config_path: Path, out: Path, share: float | None, batches: int, overrides: tuple[str, ...]) -> None:
    """Measure each signal's initial loss with the live teacher and the untrained student, and write
    the config's recipe with weights that make every signal start at SHARE x the cross-entropy
    (use it as `recipe: OUT`)."""
    from drivekd.distill.calibrate import run_calibrate
    from drivekd.train.config import load_config

    config = load_config(DistillConfig, config_path, overrides)
    path, result = run_calibrate(config, out, share=share, batches=batches)
    for name, loss in result["initial_losses"].items():
        weight = result["weights"].get(name)
        click.echo(f"{name:>16}  initial loss {loss:.4g}" + (f"  weight {weight:.6g}" if weight is not None else ""))
    click.echo(f"wrote {path}")


def train_from_config(
    cls: type[Any], run: Callable[..., Path], config_path: Path, overrides: tuple[str, ...], resume: bool
) -> None:
    """Load a `cls` config, train it with `run`, and say whether final weights were written (a finished
    run resumed at the same config has nothing to do)."""
    from drivekd.train.config import load_config

    config = load_config(cls, config_path, overrides)
    before = _stamp(config.train.output_dir)
    final = run(config, resume=resume)
    wrote = before is None or _stamp(config.train.output_dir) != before
    click.echo(f"saved {final}" if wrote else f"nothing to do: {final.parent} is finished at this config")


def _stamp(output_dir: str) -> float | None:
    """When the run folder's final weights were written (None: not yet)."""
    final = Path(output_dir) / "final" / "model.safetensors"
    return final.stat().st_mtime_ns if final.is_file() else None
