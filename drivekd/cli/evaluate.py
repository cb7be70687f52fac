"""`drivekd eval`: generate predictions for a split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from drivekd.errors import DataError

DEFAULT_SPLIT = "test"
_SPLIT_HELP = (
    f"Split of a dataset folder (its SPLIT.jsonl) [default: {DEFAULT_SPLIT}]. A single data file has no "
    "splits: it is used whole, and --split is refused."
)


def split_file(data_path: Path, split: str, option: str = "--split", file_hint: str = "") -> Path:
    """`data_path/split.jsonl`, or a one-line error: for a folder, naming the split and the splits it has;
    for a single data file, saying that a file has no splits (`file_hint`: what to do instead)."""
    if not data_path.exists():
        raise DataError(f"{data_path}: no such file or folder")
    if not data_path.is_dir():
        raise DataError(f"{data_path}: a data file has no splits, so {option} {split} cannot be honoured; {file_hint}")
    file = data_path / f"{split}.jsonl"
    if not file.is_file():
        found = sorted(p.stem for p in data_path.glob("*.jsonl") if p.is_file())
        has = "splits found: " + ", ".join(found) if found else "it holds no SPLIT.jsonl file"
        raise DataError(f"{data_path}: no split {split!r} ({split}.jsonl) in this dataset folder; {has}")
    return file


def _corruption_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """`list` prints the corruptions and ends the command; a bad name or severity is refused here,
    eagerly, before the other options are even checked and long before a model loads."""
    if value is None:
        return None
    from drivekd.eval.corruptions import listing, parse_corruption

    if value.strip() == "list":
        click.echo(listing())
        ctx.exit(0)
    return parse_corruption(value)


def eval_samples(data_path: Path, split: str | None, image_roots: Sequence[str] = ()) -> tuple[list[Any], str]:
    """The samples `drivekd eval` predicts, and what they are (for messages).

    A dataset folder: its `split` (default `test`), which must exist. A single data file: the whole
    file, and only when no --split was given: a file has no splits, and `--split test` on it would
    silently predict every sample, the training ones included."""
    from drivekd.data.formats import load_samples, load_split

    if data_path.is_dir() or split is not None:
        split = split or DEFAULT_SPLIT
        hint = f"drop --split to use the whole file, or split it first: drivekd data split {data_path} DIR"
        split_file(data_path, split, "--split", hint)
        return load_split(data_path, split, image_roots), f"split {split!r}"
    return load_samples(data_path, None, image_roots), "the whole file: a data file has no splits"


@click.command(name="eval")
@click.option("--model", "model_path", required=True, help="Checkpoint directory (e.g. RUN/final), preset or hub id.")
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True, help="Dataset folder or file.")
@click.option("--split", default=None, help=_SPLIT_HELP)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Prediction JSONL to write.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=96, show_default=True)
@click.option(
    "--capability", default=None, help="Only this capability's samples (perception, reasoning, planning, or an alias)."
)
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
@click.option(
    "--corruption",
    "corruption",
    default=None,
    is_eager=True,
    callback=_corruption_option,
    metavar="NAME[:SEVERITY]|list",
    help="DriveBench robustness setting: corrupt every image on the fly (severity 1-5, default 3). "
    "`--corruption list` prints the 15 names, their groups and what each does.",
)
@click.option(
    "--corruption-seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the corruptions' randomness (with the sample id and image: the same pixels every run).",
)
@click.option("--text-only", is_flag=True, help="DriveBench's text-only setting: the questions without their images.")
def evaluate(
    model_path: str,
    data_path: Path,
    split: str | None,
    out: Path,
    batch_size: int,
    max_new_tokens: int,
    capability: str | None,
    limit: int | None,
    dtype: str,
    device: str,
    image_roots: tuple[str, ...],
    other_images: bool,
    corruption: Any,
    corruption_seed: int,
    text_only: bool,
) -> None:
    """Greedy-decode answers (KV cache, batched) and write one JSON line per sample."""
    import dataclasses

    from drivekd.data.sample import image_blind_control, normalize_capability
    from drivekd.data.validate import validate_samples
    from drivekd.eval.corruptions import InputSetting
    from drivekd.eval.predict import predict
    from drivekd.models.loading import LoadOptions, load_backend

    if text_only and other_images:
        raise DataError("--text-only shows no images, so --other-images has none to swap: choose one")
    setting = (
        InputSetting(text_only=True, corruption=corruption.corruption if corruption else None)
        if text_only
        else dataclasses.replace(corruption, seed=corruption_seed)
        if corruption
        else None
    )
    samples, what = eval_samples(data_path, split, image_roots)
    pool = samples  # --other-images: any scene of the data may lend its images, not only the selected ones
    if capability:
        capability = normalize_capability(capability, where="--capability")
        samples = [s for s in samples if s.capability == capability]
        what += f", capability {capability}"
    samples = samples[:limit] if limit else samples
    validate_samples(samples).raise_if_bad(f"{data_path} ({what})")
    if not data_path.is_dir():
        click.echo(f"note: predicting {len(samples)} samples from {what}", err=True)
    kept_own = 0
    if other_images:
        samples, kept_own = image_blind_control(samples, source=f"{data_path}: --other-images", pool=pool)
        validate_samples(samples).raise_if_bad(f"{data_path}: --other-images")
        if kept_own:
            click.echo(
                f"warning: --other-images: {kept_own} of {len(samples)} sample(s) keep their own images: no other "
                "scene has their camera list",
                err=True,
            )
    backend = load_backend(model_path, LoadOptions(dtype=dtype, device=device))
    stats = predict(backend, samples, out, batch_size=batch_size, max_new_tokens=max_new_tokens, setting=setting)
    click.echo(
        f"wrote {stats['samples']} predictions to {out} in {stats['seconds']:.1f} s ({stats['samples_per_s']:.2f} samples/s)"
        + ("" if setting is None else f", setting {setting.label}")
        + (
            ""
            if not other_images
            else ", every sample shown another scene's images"
            if not kept_own
            else f", {len(samples) - kept_own} of {len(samples)} samples shown another scene's images "
            f"({kept_own} kept their own: no other scene has their cameras)"
        )
    )


@click.command()
@click.option(
    "--data",
    "data_path",
    type=click.Path(path_type=Path),
    required=True,
    help="Dataset folder with the --train-split and --split files (a single data file has no splits).",
)
@click.option("--split", default=DEFAULT_SPLIT, show_default=True, help="The split to predict.")
@click.option("--train-split", default="train", show_default=True, help="Where the majority answers are counted.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def baseline(data_path: Path, split: str, train_split: str, out: Path) -> None:
    """Write the majority-class baseline's predictions (score them with `drivekd score`)."""
    from drivekd.data.formats import load_split
    from drivekd.eval.baselines import majority_records
    from drivekd.eval.predict import write_records

    if split == train_split:
        raise DataError(
            f"--split and --train-split are both {split!r}: the majority would be counted on the answers it "
            "is scored against"
        )
    if data_path.is_file():
        raise DataError(
            f"{data_path}: a data file has no splits, and the baseline counts its answers on --train-split "
            f"({train_split}) to predict --split ({split}); split it first: drivekd data split {data_path} DIR"
        )
    split_file(data_path, train_split, "--train-split")
    split_file(data_path, split)
    samples, train = load_split(data_path, split), load_split(data_path, train_split)
    for name, part in ((split, samples), (train_split, train)):
        if not part:
            raise DataError(f"{data_path / (name + '.jsonl')}: no samples")
    write_records(majority_records(train, samples), out)
    click.echo(f"wrote {len(samples)} majority-baseline predictions to {out}")
