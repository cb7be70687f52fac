"""`drivekd prestudy`: the layer-wise pre-study (docs/method.md §6) and the recipe it recommends."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--model", required=True, help="Checkpoint directory, preset (e.g. tiny-internvl-teacher) or hub id.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True, help="Driving dataset folder.")
@click.option(
    "--general",
    "general_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="General control set folder (`drivekd data general`) for panel (d); read from its test split.",
)
@click.option("--split", default="val", show_default=True, help="Split of --data to analyse.")
@click.option(
    "--max-samples", type=int, default=96, show_default=True, help="Samples used (round-robin over capabilities)."
)
@click.option("--batch", "batch_size", type=int, default=8, show_default=True, help="Samples per forward pass.")
@click.option("--tau", type=float, default=1.0, show_default=True, help="Temperature of the margin's softmax.")
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Folder for prestudy.json/.png and recipe.yaml."
)
def prestudy(
    model: str,
    data_dir: Path,
    general_dir: Path | None,
    split: str,
    max_samples: int,
    batch_size: int,
    tau: float,
    out: Path,
) -> None:
    """Layer-wise alignment, intra-group similarity, dispersion and answer margins; recommend a recipe."""
    from drivekd.eval.prestudy import run_prestudy, summary_markdown

    result = run_prestudy(
        model,
        data_dir,
        out,
        general_dir=general_dir,
        split=split,
        max_samples=max_samples,
        batch_size=batch_size,
        tau=tau,
    )
    click.echo(summary_markdown(result))
