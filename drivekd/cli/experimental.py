"""`drivekd experimental`: commands of objectives with no reported result yet (drivekd/experimental)."""

from __future__ import annotations

from pathlib import Path

import click

from drivekd.cli.train import train_from_config
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

    train_from_config(ReweightDistillConfig, run_distill_reweight, config_path, overrides, resume)


@experimental.command(
    name="sft-tag-attention", context_settings={"ignore_unknown_options": True}, epilog=reference(TagAttentionSFTConfig)
)
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True, help="Experiment YAML.")
@click.option("--resume", is_flag=True, help="Continue from the run directory's last checkpoint.")
@click.argument("overrides", nargs=-1)
def sft_tag_attention(config_path: Path, resume: bool, overrides: tuple[str, ...]) -> None:
    """`drivekd sft` with the tag-attention loss beside the CE (section `tag_attention`)."""
    from drivekd.experimental.tag_attention import run_sft_tag_attention

    train_from_config(TagAttentionSFTConfig, run_sft_tag_attention, config_path, overrides, resume)
