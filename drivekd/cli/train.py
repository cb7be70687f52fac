"""`drivekd sft`: supervised fine-tuning from a YAML config."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help="Experiment YAML (see configs/)."
)
@click.option("--resume", is_flag=True, help="Continue from the run directory's last checkpoint.")
@click.argument("overrides", nargs=-1)
def sft(config_path: Path, resume: bool, overrides: tuple[str, ...]) -> None:
    """Fine-tune a VLM on answers (cross-entropy). OVERRIDES are KEY=VALUE, e.g. train.lr=1e-4."""
    from drivekd.train.config import SFTConfig, load_config
    from drivekd.train.sft import run_sft

    config = load_config(SFTConfig, config_path, overrides)
    final = run_sft(config, resume=resume)
    click.echo(f"saved {final}")


@click.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help="Distillation YAML (see configs/)."
)
@click.option("--resume", is_flag=True, help="Continue from the run directory's last checkpoint.")
@click.argument("overrides", nargs=-1)
def distill(config_path: Path, resume: bool, overrides: tuple[str, ...]) -> None:
    """Distil teachers into a student: CE plus the recipe's signals, combined by the gradient strategy."""
    from drivekd.distill.run import run_distill
    from drivekd.train.config import DistillConfig, load_config

    config = load_config(DistillConfig, config_path, overrides)
    final = run_distill(config, resume=resume)
    click.echo(f"saved {final}")


@click.command(name="cache-teacher", context_settings={"ignore_unknown_options": True})
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True, help="The distillation YAML.")
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Cache folder (default: the config's `cache`)."
)
@click.argument("overrides", nargs=-1)
def cache_teacher(config_path: Path, out: Path | None, overrides: tuple[str, ...]) -> None:
    """Run the teachers once and store the recipe's targets (fp16 safetensors); `distill` with
    `cache=DIR` then loads no teacher."""
    from drivekd.distill.run import run_cache_teacher
    from drivekd.train.config import DistillConfig, load_config

    config = load_config(DistillConfig, config_path, overrides)
    click.echo(f"wrote {run_cache_teacher(config, out)}")
