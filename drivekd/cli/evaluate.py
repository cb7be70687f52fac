"""`drivekd eval`: generate predictions for a split."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="eval")
@click.option("--model", "model_path", required=True, help="Checkpoint directory (e.g. RUN/final), preset or hub id.")
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True, help="Dataset folder or file.")
@click.option("--split", default="test", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Prediction JSONL to write.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=96, show_default=True)
@click.option("--capability", type=click.Choice(["perception", "reasoning", "planning"]), default=None)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="First N samples only.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--image-root", "image_roots", multiple=True, metavar="DIR|PREFIX=DIR")
@click.option(
    "--other-images",
    is_flag=True,
    help="Image-blind control: show every sample another scene's cameras. Scores that barely move mean "
    "the model answers from the text alone.",
)
def evaluate(
    model_path: str,
    data_path: Path,
    split: str,
    out: Path,
    batch_size: int,
    max_new_tokens: int,
    capability: str | None,
    limit: int | None,
    dtype: str,
    device: str,
    image_roots: tuple[str, ...],
    other_images: bool,
) -> None:
    """Greedy-decode answers (KV cache, batched) and write one JSON line per sample."""
    from drivekd.data.formats import load_samples, load_split
    from drivekd.data.sample import with_other_images
    from drivekd.data.validate import validate_samples
    from drivekd.eval.predict import predict
    from drivekd.models.loading import LoadOptions, load_backend

    samples = (
        load_split(data_path, split, image_roots) if data_path.is_dir() else load_samples(data_path, None, image_roots)
    )
    if capability:
        samples = [s for s in samples if s.capability == capability]
    samples = samples[:limit] if limit else samples
    validate_samples(samples).raise_if_bad(str(data_path))
    if other_images:
        samples = with_other_images(samples)
    backend = load_backend(model_path, LoadOptions(dtype=dtype, device=device))
    stats = predict(backend, samples, out, batch_size=batch_size, max_new_tokens=max_new_tokens)
    click.echo(
        f"wrote {stats['samples']} predictions to {out} in {stats['seconds']:.1f} s ({stats['samples_per_s']:.2f} samples/s)"
        + (", every sample shown another scene's images" if other_images else "")
    )


@click.command()
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True, help="Dataset folder.")
@click.option("--split", default="test", show_default=True)
@click.option("--train-split", default="train", show_default=True, help="Where the majority answers are counted.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def baseline(data_path: Path, split: str, train_split: str, out: Path) -> None:
    """Write the majority-class baseline's predictions (score them with `drivekd score`)."""
    from drivekd.data.formats import load_split
    from drivekd.eval.baselines import majority_records
    from drivekd.eval.predict import write_records

    samples = load_split(data_path, split)
    write_records(majority_records(load_split(data_path, train_split), samples), out)
    click.echo(f"wrote {len(samples)} majority-baseline predictions to {out}")
