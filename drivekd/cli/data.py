"""`drivekd data ...`: generate DriveSim-QA, validate and convert driving QA datasets."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import click

from drivekd import progress
from drivekd.atomic import atomic_file
from drivekd.data.formats import FORMATS, data_files, load_samples, write_jsonl
from drivekd.data.validate import validate_samples
from drivekd.errors import DataError

_format = click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default=None, help="Input format (default: detected)."
)
_image_root = click.option(
    "--image-root",
    "image_roots",
    multiple=True,
    metavar="DIR|PREFIX=DIR",
    help="Where images live: a folder for relative paths, or PREFIX=DIR to remap a leading prefix "
    "such as '.../100k/train=/data/bdd100k/train'. Repeatable.",
)


@click.group()
def data() -> None:
    """Generate, validate and convert driving QA data."""


@data.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output dataset folder.")
@click.option(
    "--scenes", type=click.IntRange(min=1), required=True, help="Number of simulated scenes (about 8 questions each)."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Parallel processes.")
@click.option("--image-size", default="224x128", show_default=True, help="Camera image WIDTHxHEIGHT.")
@click.option(
    "--per-capability",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Questions per capability per scene.",
)
@click.option(
    "--task",
    type=click.Choice(["qa", "captions", "objects", "tagged"]),
    default="qa",
    show_default=True,
    help="qa: DriveBench-style questions; captions: one grounded scene caption per scene (pretraining); "
    "objects: colour and lights of every vehicle within 30 m, on its close-up and by its tag (grounding stage); "
    "tagged: the QA's own colour and status multiple choice for every vehicle within 30 m.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def generate(
    out: Path, scenes: int, seed: int, workers: int, image_size: str, per_capability: int, task: str, overwrite: bool
) -> None:
    """Generate DriveSim-QA from highway-env traffic (train/val/test split by scene)."""
    from drivekd.extras import SIMULATOR, require

    require(SIMULATOR, "DriveSim-QA generation")
    from drivekd.data.drivesim.generate import GenerateConfig, card_markdown
    from drivekd.data.drivesim.generate import generate as run

    try:
        width, height = (int(v) for v in image_size.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{image_size!r} is not WIDTHxHEIGHT", param_hint="--image-size") from None
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists; pass --overwrite to replace it")
    config = GenerateConfig(
        scenes=scenes, seed=seed, image_width=width, image_height=height, per_capability=per_capability, task=task
    )
    start = time.perf_counter()
    with progress.bar(total=scenes, desc="scenes", unit="scene") as bar:
        card = run(out, config, workers=workers, overwrite=overwrite, progress=bar.update)
    elapsed = time.perf_counter() - start
    click.echo(card_markdown(card))
    click.echo(
        f"\nwrote {card['samples']} samples to {out} in {elapsed:.1f} s ({card['samples'] / elapsed:.1f} samples/s, {workers} worker(s))"
    )


@data.command()
@click.argument("path", type=click.Path(path_type=Path))
@_format
@_image_root
@click.option("--no-image-check", is_flag=True, help="Skip checking that images exist and decode.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option(
    "--strict",
    is_flag=True,
    help="Also fail on items marked multiple choice whose options could not be found, or with options but "
    "no correct letter.",
)
def validate(
    path: Path, fmt: str | None, image_roots: tuple[str, ...], no_image_check: bool, as_json: bool, strict: bool
) -> None:
    """Check a dataset (file or native folder): counts, duplicates, and every image found and decoded.
    Exit 0 only if valid."""
    samples = load_samples(path, fmt, image_roots)
    report = validate_samples(samples, check_images=not no_image_check)
    if as_json:
        click.echo(json.dumps({"path": str(path), **report.to_json()}, sort_keys=True))
    else:
        click.echo(
            f"{path}: {report.samples} samples, {report.images_referenced} images referenced, "
            f"{len(report.missing_images)} missing, {len(report.unreadable_images)} unreadable"
        )
        click.echo("capability: " + ", ".join(f"{k} {v}" for k, v in report.by_capability.items()))
        click.echo("question type: " + ", ".join(f"{k} {v}" for k, v in report.by_question_type.items()))
        click.echo(f"multiple choice: {report.multiple_choice}")
        click.echo(
            f"duplicate items: {report.duplicate_items}"
            + (
                f" (exact repeats of an earlier item, kept; first: {report.duplicates[0][0]} repeats "
                f"{report.duplicates[0][1]}; --strict makes this an error)"
                if report.duplicates
                else ""
            )
        )
        if report.mc_without_options:
            click.echo(
                f"warning: {len(report.mc_without_options)} item(s) marked multiple choice have no options in "
                f"their question and will be scored as open-ended text (first: {report.mc_without_options[0]}); "
                "--strict makes this an error",
                err=True,
            )
        if report.mc_without_letter:
            click.echo(
                f"warning: {len(report.mc_without_letter)} item(s) have options but no correct letter in their "
                f"answer (first: {report.mc_without_letter[0]}); `drivekd score` refuses them; --strict makes "
                "this an error",
                err=True,
            )
    report.raise_if_bad(str(path), strict=strict)


def _copy_images(src: Path, samples: list, target: Path) -> None:
    """One copy per distinct source file, named by its content hash: two frames of one scene never
    share a copy their sources do not share. The caller has checked that every image decodes."""
    import hashlib

    from drivekd.data.sample import ImageRef

    names: dict[str, str] = {}  # resolved source path -> copy name
    for s in samples:
        for im in s.images:
            source = str(Path(im.path).resolve())
            if source in names:
                continue
            digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()[:20]
            names[source] = f"{digest}{Path(source).suffix.lower()}"
    target.mkdir(parents=True, exist_ok=True)
    for source, name in names.items():
        if not (target / name).is_file():
            with atomic_file(target / name) as tmp:
                shutil.copyfile(source, tmp)
    for s in samples:
        s.images = [ImageRef(im.camera, str(target / names[str(Path(im.path).resolve())])) for im in s.images]


@data.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@_format
@_image_root
@click.option(
    "--copy-images", is_flag=True, help="Copy images into DST's folder under images/ (default: reference them)."
)
@click.option(
    "--no-image-check",
    is_flag=True,
    help="Write DST even if images are missing or do not decode (e.g. converting where the images are not); "
    "not with --copy-images.",
)
def convert(
    src: Path, dst: Path, fmt: str | None, image_roots: tuple[str, ...], copy_images: bool, no_image_check: bool
) -> None:
    """Convert SRC (any supported format) to native JSONL at DST. Every image must exist and decode."""
    if copy_images and no_image_check:
        raise click.BadParameter("images are decoded to be copied", param_hint="--no-image-check")
    samples = load_samples(src, fmt, image_roots)
    validate_samples(samples, check_images=not no_image_check).raise_if_bad(str(src))
    if copy_images:
        _copy_images(src, samples, dst.resolve().parent / "images")
    write_jsonl(samples, dst)
    click.echo(f"wrote {len(samples)} samples from {', '.join(map(str, data_files(src)))} to {dst}")


@data.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output dataset folder.")
@_format
@click.option("--overwrite", is_flag=True, help="Replace OUT's split files if they exist.")
def drill(src: Path, out: Path, fmt: str | None, overwrite: bool) -> None:
    """Write option-lookup items (text only) from SRC's multiple-choice samples, split by split.

    `Which option says "Black."? ... A. White. B. Black.` -> `Final: {B. Black.}`: the step a language
    model trained from scratch must learn before its multiple-choice letters mean anything. Mix them
    into SFT with `data.mix` or train on them first (docs/teacher-study.md, "The learning rate is part of it").
    """
    from drivekd.data.drill import option_lookup

    files = data_files(src)
    splits = [f.stem if src.is_dir() else "train" for f in files]
    if not overwrite and any((out / f"{split}.jsonl").exists() for split in splits):
        raise DataError(f"{out}: already holds {', '.join(s + '.jsonl' for s in splits)}; pass --overwrite")
    # Every input is read before anything is written: a bad split leaves OUT untouched.
    drilled = {split: option_lookup(load_samples(file, fmt)) for file, split in zip(files, splits, strict=True)}
    made = {split: len(items) for split, items in drilled.items() if items}
    if not made:
        raise DataError(f"{src}: no multiple-choice samples (with choices and a correct letter) to drill")
    out.mkdir(parents=True, exist_ok=True)
    for split in made:
        write_jsonl(drilled[split], out / f"{split}.jsonl")
    click.echo(f"wrote {', '.join(f'{n} {split}' for split, n in made.items())} option-lookup items to {out}")


@data.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@_format
@_image_root
@click.option("--val", "val_fraction", type=click.FloatRange(0, 1), default=0.1, show_default=True)
@click.option("--test", "test_fraction", type=click.FloatRange(0, 1), default=0.1, show_default=True)
@click.option(
    "--by",
    type=click.Choice(["scene", "sample"]),
    default="scene",
    show_default=True,
    help="scene: no scene in two splits (questions about one scene share its images); sample: items alone.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def split(
    src: Path,
    out: Path,
    fmt: str | None,
    image_roots: tuple[str, ...],
    val_fraction: float,
    test_fraction: float,
    by: str,
    seed: int,
    overwrite: bool,
) -> None:
    """Split a data file (any format) into a native folder OUT with train/val/test.jsonl."""
    import random

    if val_fraction + test_fraction >= 1:
        raise click.BadParameter("--val + --test must leave something to train on", param_hint="--val/--test")
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists; pass --overwrite to replace it")
    samples = load_samples(src, fmt, image_roots)
    inside = next(
        (im.path for s in samples for im in s.images if Path(im.path).resolve().is_relative_to(out.resolve())), None
    )
    if inside is not None:
        raise DataError(f"{out}: holds image {inside} of the data being split; choose an OUT outside the images")
    groups = list(dict.fromkeys(s.scene_id if by == "scene" else s.id for s in samples))
    random.Random(seed).shuffle(groups)
    n_val, n_test = round(len(groups) * val_fraction), round(len(groups) * test_fraction)
    if len(groups) - n_val - n_test < 1 or (val_fraction > 0 and n_val == 0) or (test_fraction > 0 and n_test == 0):
        raise DataError(f"{src}: {len(groups)} {by}(s) cannot be split {val_fraction}/{test_fraction}")
    split_of = {g: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, g in enumerate(groups)}
    from drivekd.atomic import atomic_dir

    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name in ("train", "val", "test"):
            part = [s for s in samples if split_of[s.scene_id if by == "scene" else s.id] == name]
            write_jsonl(part, tmp / f"{name}.jsonl")
    # image paths were written relative to the temporary folder, a sibling of OUT: valid after the rename
    counts = {name: sum(1 for g in split_of.values() if g == name) for name in ("train", "val", "test")}
    click.echo(f"wrote {out}: " + ", ".join(f"{name} {n} {by}(s)" for name, n in counts.items()))


@data.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print card.json as it is.")
def card(directory: Path, as_json: bool) -> None:
    """Show a generated dataset's card: counts per split and capability, baselines per question type."""
    from drivekd.data.drivesim.generate import card_markdown

    file = directory / "card.json"
    if not file.is_file():
        raise DataError(f"{directory}: no card.json (only generated DriveSim-QA folders have one)")
    card = json.loads(file.read_text(encoding="utf-8"))
    click.echo(json.dumps(card, indent=2) if as_json else card_markdown(card))


@data.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="PNG file to write.")
@click.option("--scenes", type=click.IntRange(min=1), default=6, show_default=True)
@click.option(
    "--corruption",
    default=None,
    metavar="NAME[:SEVERITY]|all[:SEVERITY]",
    help="Instead: the first sample's first camera clean and under this corruption (all: every one), "
    "as `drivekd eval --corruption` shows it.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="With --corruption: its seed.")
@_format
@_image_root
def sheet(
    path: Path,
    out: Path,
    scenes: int,
    corruption: str | None,
    seed: int,
    fmt: str | None,
    image_roots: tuple[str, ...],
) -> None:
    """Draw a contact sheet: each scene's cameras side by side, tagged objects circled, one question."""
    from drivekd.data.contact_sheet import save_contact_sheet

    settings = _sheet_settings(corruption, seed) if corruption is not None else None
    samples = load_samples(path, fmt, image_roots)
    validate_samples(samples).raise_if_bad(str(path))
    if settings is not None:
        from drivekd.data.contact_sheet import corruption_sheet

        with atomic_file(out) as tmp:
            corruption_sheet(samples[0], settings).save(tmp, format="PNG", optimize=True)
        click.echo(f"wrote {out}: sample {samples[0].id}, {len(settings)} corruption(s)")
        return
    bad_tags = save_contact_sheet(samples, out, scenes)
    if bad_tags:
        (sample_id, tag), n = bad_tags[0], len(bad_tags)
        click.echo(
            f"warning: {n} object tag(s) not drawn: neither fractions of the image nor pixels inside it "
            f"(first: {tag} in sample {sample_id})",
            err=True,
        )
    click.echo(f"wrote {out}")


def _sheet_settings(spec: str, seed: int) -> list[Any]:
    """`all[:SEVERITY]`: every corruption at that severity; otherwise one, as `drivekd eval` reads it."""
    from drivekd.eval.corruptions import CORRUPTIONS, parse_corruption

    name, colon, level = spec.partition(":")
    if name == "all":
        return [parse_corruption(f"{c}{colon}{level}", seed=seed) for c in CORRUPTIONS]
    return [parse_corruption(spec, seed=seed)]


@data.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output dataset folder.")
@click.option("--samples", type=int, required=True, help="Number of questions (all in test.jsonl).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def general(out: Path, samples: int, seed: int, overwrite: bool) -> None:
    """Generate a small non-driving control set (coloured shapes) for `drivekd prestudy --general`."""
    from drivekd.data.general import generate_general

    info = generate_general(out, samples, seed, overwrite=overwrite)
    kinds = ", ".join(f"{k} {v}" for k, v in info["by_question_type"].items())
    click.echo(f"wrote {info['samples']} general samples ({kinds}) to {out / (info['split'] + '.jsonl')}")
