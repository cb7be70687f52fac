"""`drivekd experimental`: commands of objectives with no reported result yet (drivekd/experimental)."""

from __future__ import annotations

from pathlib import Path

import click

from drivekd.cli.train import _stamp
from drivekd.experimental.config import ReweightDistillConfig, TagAttentionSFTConfig
from drivekd.train.config import reference


@click.group()
def experimental() -> None:
    """Objectives with no reported result yet: their configs and commands may change."""


@experimental.command(
    name="distill-reweight", context_settings={"ignore_unknown_options": True}, epilog=reference(ReweightDistillConfig)
)
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True, help="Distillation YAML.")
@click.option("--resume", is_flag=True, help="Continue from the run directory's last checkpoint.")
@click.argument("overrides", nargs=-1)
def distill_reweight(config_path: Path, resume: bool, overrides: tuple[str, ...]) -> None:
    """`drivekd distill` with online loss reweighting: the loss weights follow the gradient norms
    (section `reweight`, docs/method.md §4)."""
    from drivekd.experimental.reweight import run_distill_reweight
    from drivekd.train.config import load_config

    config = load_config(ReweightDistillConfig, config_path, overrides)
    before = _stamp(config.train.output_dir)
    final = run_distill_reweight(config, resume=resume)
    wrote = before is None or _stamp(config.train.output_dir) != before
    click.echo(f"saved {final}" if wrote else f"nothing to do: {final.parent} is finished at this config")


@experimental.command(
    name="sft-tag-attention", context_settings={"ignore_unknown_options": True}, epilog=reference(TagAttentionSFTConfig)
)
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True, help="Experiment YAML.")
@click.option("--resume", is_flag=True, help="Continue from the run directory's last checkpoint.")
@click.argument("overrides", nargs=-1)
def sft_tag_attention(config_path: Path, resume: bool, overrides: tuple[str, ...]) -> None:
    """`drivekd sft` with the tag-attention loss beside the CE (section `tag_attention`)."""
    from drivekd.experimental.tag_attention import run_sft_tag_attention
    from drivekd.train.config import load_config

    config = load_config(TagAttentionSFTConfig, config_path, overrides)
    before = _stamp(config.train.output_dir)
    final = run_sft_tag_attention(config, resume=resume)
    wrote = before is None or _stamp(config.train.output_dir) != before
    click.echo(f"saved {final}" if wrote else f"nothing to do: {final.parent} is finished at this config")
