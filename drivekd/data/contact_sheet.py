"""A contact sheet of a dataset's scenes: every camera side by side, tagged objects marked."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from drivekd.data.sample import OBJECT_TAG, Sample


def contact_sheet(samples: Sequence[Sample], scenes: int, caption_width: int = 300) -> Image.Image:
    by_scene: dict[str, list[Sample]] = {}
    for s in samples:
        by_scene.setdefault(s.scene_id, []).append(s)
    rows = []
    for scene_samples in list(by_scene.values())[:scenes]:
        first = scene_samples[0]
        tiles = [Image.open(im.path).convert("RGB") for im in first.images]
        draw_tags = {im.camera: ImageDraw.Draw(tile) for im, tile in zip(first.images, tiles, strict=True)}
        for s in scene_samples:
            for cam, x, y in OBJECT_TAG.findall(s.question + s.answer):
                if cam in draw_tags:
                    w, h = tiles[0].size
                    u, v = float(x) * w, float(y) * h
                    draw_tags[cam].ellipse([u - 3, v - 3, u + 3, v + 3], outline=(255, 0, 255))
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


def save_contact_sheet(samples: Sequence[Sample], out: Path, scenes: int) -> None:
    from drivekd.atomic import atomic_file

    with atomic_file(out) as tmp:
        contact_sheet(samples, scenes).save(tmp, format="PNG")
