"""`drivekd models ...`: presets and the shipped tokenizer."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def models() -> None:
    """Inspect presets; rebuild the shipped tokenizer."""


@models.command(name="list")
def list_presets() -> None:
    """Tiny presets with their sizes (parameters, LM layers, visual tokens per 224x128 image)."""
    from drivekd.models.loading import PRESETS, count_parameters, load_backend

    click.echo("| preset | family | parameters | LM layers | visual tokens / image |\n|---|---|---|---|---|")
    for name in PRESETS:
        b = load_backend(name)
        click.echo(
            f"| {name} | {b.family} | {count_parameters(b) / 1e6:.2f}M | {b.num_layers} | {b.visual_token_count(224, 128)} |"
        )


@models.command(name="build-tokenizer")
@click.option(
    "--data",
    "data_path",
    type=click.Path(path_type=Path),
    required=True,
    help="A DriveSim-QA folder (all splits are read).",
)
@click.option("--vocab-size", type=click.IntRange(min=300), default=2048, show_default=True)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Default: the shipped drivekd/models/assets/tokenizer.json.",
)
def build_tokenizer(data_path: Path, vocab_size: int, out: Path | None) -> None:
    """Train the byte-level BPE tokenizer the tiny presets share, on a dataset's questions and answers."""
    from drivekd.atomic import atomic_file
    from drivekd.data.formats import load_samples
    from drivekd.data.sample import IMAGE_PLACEHOLDER
    from drivekd.models.tokenizer import SHIPPED, train_tokenizer

    samples = load_samples(data_path)
    texts = [s.question.replace(IMAGE_PLACEHOLDER, "") for s in samples] + [s.answer for s in samples]
    tok = train_tokenizer(texts, vocab_size)
    target = out or SHIPPED
    with atomic_file(target) as tmp:
        tok.save(str(tmp))
    click.echo(f"wrote {target}: {tok.get_vocab_size()} tokens from {len(samples)} samples")
