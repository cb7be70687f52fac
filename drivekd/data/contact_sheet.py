"""A contact sheet of a dataset's scenes: every camera side by side, tagged objects marked."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from drivekd.data.sample import OBJECT_TAG, Sample, tag_fraction


def contact_sheet(
    samples: Sequence[Sample], scenes: int, caption_width: int = 300, bad_tags: list[tuple[str, str]] | None = None
) -> Image.Image:
    """Rows of the first `scenes` scenes. Object tags are circled where they point: fractions of the
    image, or DriveLM's pixel coordinates (converted with the camera's image size); a tag that is
    neither (e.g. pixels beyond the image) is not drawn but appended to `bad_tags` as (sample id, tag)."""
    by_scene: dict[str, list[Sample]] = {}
    for s in samples:
        by_scene.setdefault(s.scene_id, []).append(s)
    rows = []
    for scene_samples in list(by_scene.values())[:scenes]:
        first = scene_samples[0]
        tiles = [Image.open(im.path).convert("RGB") for im in first.images]
        tile_of = {im.camera: tile for im, tile in zip(first.images, tiles, strict=True)}
        for s in scene_samples:
            for match in OBJECT_TAG.finditer(s.question + s.answer):
                cam, x, y = match.groups()
                if cam not in tile_of:
                    continue
                tile = tile_of[cam]
                try:
                    point = tag_fraction(float(x), float(y), *tile.size)
                except ValueError:  # e.g. "1.2.3"
                    point = None
                if point is None:
                    if bad_tags is not None:
                        bad_tags.append((s.id, match.group(0)))
                    continue
                u, v = point[0] * tile.width, point[1] * tile.height
                ImageDraw.Draw(tile).ellipse([u - 3, v - 3, u + 3, v + 3], outline=(255, 0, 255))
        caption = next((s for s in scene_samples if s.choices), first)
        text = caption.question.split("\n", len(first.images))[-1]
        final = caption.answer.splitlines()[0]
        rows.append((tiles, f"[{caption.capability}/{caption.question_type}] {text}\n{final}"))
    if not rows:
        raise ValueError("no samples to show")
    w, h = rows[0][0][0].size
    cams = len(rows[0][0])
    sheet = Image.new("RGB", (w * cams + caption_width, h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (tiles, caption) in enumerate(rows):
        for c, tile in enumerate(tiles):
            sheet.paste(tile, (c * w, r * h))
        wrapped = "\n".join(textwrap.fill(line, width=caption_width // 6) for line in caption.splitlines())
        draw.multiline_text((w * cams + 4, r * h + 4), wrapped, fill=(0, 0, 0), spacing=1)
    return sheet


def save_contact_sheet(samples: Sequence[Sample], out: Path, scenes: int) -> list[tuple[str, str]]:
    """Write the sheet; returns the (sample id, tag) of every object tag it could not place."""
    from drivekd.atomic import atomic_file

    bad_tags: list[tuple[str, str]] = []
    with atomic_file(out) as tmp:
        contact_sheet(samples, scenes, bad_tags=bad_tags).save(tmp, format="PNG")
    return bad_tags


def corruption_sheet(
    sample: Sample, settings: Sequence[object], columns: int = 4, label_height: int = 24
) -> Image.Image:
    """The first camera of `sample` clean and under each robustness setting (drivekd/eval/corruptions.py),
    in a grid, each tile labelled with its setting and group. A setting that draws whether it strikes
    (camera_crash, frame_lost) and spares this image says so under the tile."""
    from drivekd.eval.corruptions import InputSetting, corrupt_image

    with Image.open(sample.images[0].path) as im:
        clean = im.convert("RGB")
    tiles: list[tuple[Image.Image, str]] = [(clean, f"clean ({sample.images[0].camera})")]
    for setting in settings:
        assert isinstance(setting, InputSetting)
        shown = corrupt_image(clean, setting, sample, 0)
        spared = " - spared here" if shown.tobytes() == clean.tobytes() else ""
        tiles.append((shown, f"{setting.label}{spared}\n{setting.group}"))
    w, h = clean.size
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (w * columns, (h + label_height) * rows), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (tile, label) in enumerate(tiles):
        x, y = (k % columns) * w, (k // columns) * (h + label_height)
        sheet.paste(tile, (x, y))
        draw.multiline_text((x + 3, y + h + 1), label, fill=(0, 0, 0), spacing=0)
    return sheet
