"""`drivekd models ...`: presets and the shipped tokenizer."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def models() -> None:
    """Presets, shipped bases, real-size architectures; rebuild the shipped tokenizer."""


@models.command(name="list")
def list_presets() -> None:
    """Tiny presets (random initialisation) and the shipped pretrained models, with their sizes."""
    from drivekd.errors import DriveKDError
    from drivekd.models.loading import PRESETS, PRETRAINED, count_parameters, load_backend, pretrained_card

    click.echo(
        "| model | kind | family | parameters | LM layers | visual tokens / 224x128 image | held-out Avg (majority) |"
        "\n|---|---|---|---|---|---|---|"
    )
    for name in (*PRESETS, *PRETRAINED):
        try:
            b = load_backend(name)
        except DriveKDError as e:
            click.echo(f"| {name} | pretrained | – | – | – | – | missing: {e} |")
            continue
        kind, score = "preset (random init)", "–"
        if name in PRETRAINED:
            card = pretrained_card(name)
            kind = f"pretrained ({card['built']})"
            score = f"{card['scores']['model']['Avg']:.1f} ({card['scores']['majority']['Avg']:.1f})"
        click.echo(
            f"| {name} | {kind} | {b.family} | {count_parameters(b) / 1e6:.2f}M | {b.num_layers} | "
            f"{b.visual_token_count(224, 128)} | {score} |"
        )


@models.command(name="card")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print card.json as it is.")
def show_card(name: str, as_json: bool) -> None:
    """A shipped pretrained model's card: data seeds, recipe, compute, held-out scores per type."""
    import json

    from drivekd.errors import DriveKDError
    from drivekd.models.loading import PRETRAINED, pretrained_card

    if name not in PRETRAINED:
        raise DriveKDError(f"{name}: not a shipped pretrained model ({', '.join(PRETRAINED)})")
    card = pretrained_card(name)
    if as_json:
        click.echo(json.dumps(card, indent=2))
        return
    click.echo(f"# {name}\n\n{card['about']}\n")
    click.echo(f"- built {card['built']} on {card['machine']}; rebuild: `{card['rebuild']}`")
    click.echo(f"- {card['steps']} training steps, {sum(card['seconds'].values()) / 60:.0f} min in all")
    click.echo(f"- trained and scored on DriveSim-QA seeds {card['seeds']} ({card['generator']})")
    click.echo(f"- weights {card['dtype']}, sha256 {card['weights_sha256'][:16]}...\n")
    held = card["heldout"]
    click.echo(f"Held-out test ({held['items']} items, seed {held['seed']}):\n")
    scores = card["scores"]
    click.echo("| | model | another scene's images | majority |\n|---|---:|---:|---:|")
    for key in ("Avg", "perception", "reasoning", "planning", *scores["model"]["types"]):
        cells = [scores[s].get(key, scores[s]["types"].get(key)) for s in ("model", "other_images", "majority")]
        click.echo(f"| {key} | " + " | ".join("–" if c is None else f"{c:.1f}" for c in cells) + " |")


@models.command(name="install-base")
@click.argument("export_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
def install_base(export_dir: Path) -> None:
    """Copy a finished base build (DIR/export/NAME, with its card) into the package."""
    from drivekd.models.loading import PRETRAINED_DIR
    from drivekd.study.bases import install

    click.echo(f"installed {install(export_dir, PRETRAINED_DIR)}")


@models.command(name="verify-base")
@click.argument("export_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--data-from",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="A folder holding the card's held-out and check datasets (generated when absent).",
)
@click.option("--work", type=click.Path(path_type=Path), required=True, help="Folder for predictions and data.")
@click.option("--tolerance", type=float, default=1.0, show_default=True, help="Avg points a score may differ by.")
def verify_base(export_dir: Path, data_from: Path | None, work: Path, tolerance: float) -> None:
    """Rescore a finished base build here (its hash, the held-out test, the check set) and compare with
    its card: weights built on another machine (a GPU) are checked on this one before they ship."""
    from drivekd.errors import DriveKDError
    from drivekd.study.bases import verify

    result = verify(export_dir, data_from, work, tolerance)
    click.echo(f"{result['name']} (built on {result['built_on']}):")
    for key in result["here"]:
        click.echo(f"  {key}: card {result['card'][key]:.2f}, here {result['here'][key]:.2f}")
    if not result["within_tolerance"]:
        raise DriveKDError(f"{export_dir}: scores here differ from its card by more than {tolerance} Avg points")
    click.echo("matches its card")


@models.command(name="init")
@click.option("--like", "name", required=True, help="A published architecture (see `drivekd models shapes`).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The checkpoint folder to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Initialisation seed.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="bfloat16", show_default=True)
def init_model(name: str, out: Path, seed: int, dtype: str) -> None:
    """Write a random-weight checkpoint with a published architecture (real shapes, image size and tokens
    per image; the shipped tokenizer, its vocabulary padded to the real size). It loads wherever a model
    is accepted: dry-run a configuration at real size before downloading the weights."""
    from drivekd.errors import DriveKDError
    from drivekd.models.loading import LoadOptions, init_like

    if out.exists():
        raise DriveKDError(f"{out}: already exists")
    init_like(name, out, LoadOptions(dtype=dtype, seed=seed))
    click.echo(f"wrote {out}")


@models.command(name="shapes")
def list_shapes() -> None:
    """The published architectures `models init --like` builds, with their parameter counts."""
    from drivekd.models.loading import build_like, count_parameters, real_shapes

    click.echo("| name | family | as published | parameters built | published | LM layers | tokens / image |")
    click.echo("|---|---|---|---:|---:|---:|---|")
    for name, shape in real_shapes().items():
        backend = build_like(name, meta=True)
        vision = shape["vision"]
        tokens = (
            f"{(vision['image'] // vision['patch']) ** 2 // 4} per {vision['image']}-px tile"
            if "image" in vision
            else f"(H/{vision['patch'] * vision['merge']}) x (W/{vision['patch'] * vision['merge']})"
        )
        click.echo(
            f"| {name} | {shape['family']} | {shape['hub']}{'' if shape['confirmed'] else ' (partly inferred)'} | "
            f"{count_parameters(backend):,} | {shape['parameters']:,} | {backend.num_layers} | {tokens} |"
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
