"""A small non-driving control set: coloured shapes drawn with PIL, asked about in the driving style.

The pre-study (`drivekd prestudy --general DIR`) compares the generalised margin along the answer on
driving data and on this set (docs/method.md §6 (d)). To keep the token layout comparable, every sample
has two images of DriveSim-QA's size (224x128 PNG) in the question (`IMAGE_A: <image>\\nIMAGE_B:
<image>\\n...`) and a short answer with a `Final: {...}` line. Question types (capability
`perception`, cycled so the three are balanced):

- `general_colour` (multiple choice): "What colour is the circle in IMAGE_A?" (the shape occurs once);
- `general_count` (open): "How many squares are there in IMAGE_B?" (0 to 4);
- `general_position` (multiple choice): "Which shape is directly left of the red one in IMAGE_A?".

Colours are distinct within an image, so "the red one" is unambiguous. `facts` holds the label and
every drawn shape (`shapes`: image name -> [kind, colour, x, y, size], left to right). Sample `i` is drawn from its
own generator `[seed, i]`: the output is byte-identical for a seed. Everything goes to `test.jsonl`
(native format, readable by `load_split(DIR, "test")`) and `images/`, written atomically.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from drivekd.atomic import atomic_dir
from drivekd.data.choices import mc_question
from drivekd.data.sample import IMAGE_PLACEHOLDER, ImageRef, Sample
from drivekd.errors import DataError, DriveKDError

GENERATOR_VERSION = "general-shapes/1"
SPLIT = "test"
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 210, 40),
    "white": (240, 240, 240),
    "purple": (150, 60, 200),
}
QUESTION_TYPES: tuple[str, ...] = ("general_colour", "general_count", "general_position")
IMAGE_NAMES: tuple[str, ...] = ("IMAGE_A", "IMAGE_B")
SLOTS = 4  # shapes sit in distinct columns, so "left of" is always clear
MAX_ATTEMPTS = 50


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: int  # centre, pixels
    y: int
    size: int  # bounding-box side, pixels


def random_shapes(rng: np.random.Generator, width: int, height: int) -> list[Shape]:
    """1-4 shapes in distinct columns with distinct colours, sorted left to right."""
    n = int(rng.integers(1, SLOTS + 1))
    slots = sorted(int(s) for s in rng.choice(SLOTS, size=n, replace=False))
    colours = [str(c) for c in rng.choice(list(COLOURS), size=n, replace=False)]
    slot_w = width / SLOTS
    out = []
    for slot, colour in zip(slots, colours, strict=True):
        size = int(rng.integers(max(8, height // 7), max(9, height // 4) + 1))
        jitter = int(rng.integers(-max(1, int(slot_w) // 8), max(1, int(slot_w) // 8) + 1))
        x = int(slot * slot_w + slot_w / 2 + jitter)
        y = int(rng.integers(size // 2 + 2, height - size // 2 - 1))
        out.append(Shape(str(rng.choice(SHAPES)), colour, x, y, size))
    return out


def draw(shapes: list[Shape], width: int, height: int, background: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (width, height), background)
    pen = ImageDraw.Draw(image)
    for s in shapes:
        h = s.size // 2
        box = (s.x - h, s.y - h, s.x + h, s.y + h)
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            pen.ellipse(box, fill=fill)
        elif s.kind == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(s.x, s.y - h), (s.x - h, s.y + h), (s.x + h, s.y + h)], fill=fill)
    return image


def _options(rng: np.random.Generator, correct: str, pool: list[str], k: int) -> tuple[dict[str, str], str]:
    others = [p for p in pool if p != correct]
    picked = [correct, *(str(o) for o in rng.choice(others, size=min(k - 1, len(others)), replace=False))]
    order = rng.permutation(len(picked))
    texts = [picked[i] for i in order]
    letters = "ABCDEFGH"[: len(texts)]
    choices = {letter: f"{t.capitalize()}." for letter, t in zip(letters, texts, strict=True)}
    return choices, letters[texts.index(correct)]


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def build_question(
    qtype: str, rng: np.random.Generator, scenes: dict[str, list[Shape]]
) -> tuple[str, str, dict[str, str] | None, str | None, dict[str, Any]] | None:
    """(question, answer, choices, correct letter, facts), or None if these images cannot pose `qtype`."""
    name = str(rng.choice(IMAGE_NAMES))
    shapes = scenes[name]
    if qtype == "general_colour":
        counts = Counter(s.kind for s in shapes)
        unique = [s for s in shapes if counts[s.kind] == 1]
        if not unique:
            return None
        target = unique[int(rng.integers(len(unique)))]
        choices, letter = _options(rng, target.colour, list(COLOURS), 4)
        question = mc_question(f"What colour is the {target.kind} in {name}?", choices)
        answer = f"Final: {{{letter}. {choices[letter]}}}\nObject: the {target.kind} in {name}"
        return question, answer, choices, letter, {"image": name, "shape": target.kind, "label": target.colour}
    if qtype == "general_count":
        kind = str(rng.choice(SHAPES))
        n = sum(s.kind == kind for s in shapes)
        question = f"How many {kind}s are there in {name}?"
        answer = f"Count: {n} {_plural(kind, n)} in {name}.\nFinal: {{{n}}}"
        return question, answer, None, None, {"image": name, "shape": kind, "count": n, "label": str(n)}
    if len(shapes) < 2:
        return None
    k = int(rng.integers(1, len(shapes)))
    target, left = shapes[k], shapes[k - 1]
    choices, letter = _options(rng, left.kind, list(SHAPES), len(SHAPES))
    question = mc_question(f"Which shape is directly left of the {target.colour} one in {name}?", choices)
    answer = f"Final: {{{letter}. {choices[letter]}}}\nObject: {left.colour} {left.kind}"
    return question, answer, choices, letter, {"image": name, "colour": target.colour, "label": left.kind}


def make_sample(index: int, seed: int, images_dir: Path, width: int, height: int) -> Sample:
    """Draw sample `index` (its own generator `[seed, index]`), save its two images, return it."""
    rng = np.random.default_rng([seed, index])
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    for _ in range(MAX_ATTEMPTS):
        scenes = {name: random_shapes(rng, width, height) for name in IMAGE_NAMES}
        posed = build_question(qtype, rng, scenes)
        if posed is not None:
            break
    else:  # pragma: no cover - each attempt fails with probability < 1/2
        raise RuntimeError(f"sample {index}: no {qtype} question after {MAX_ATTEMPTS} attempts")
    question, answer, choices, letter, facts = posed
    facts["shapes"] = {name: [[s.kind, s.colour, s.x, s.y, s.size] for s in scenes[name]] for name in IMAGE_NAMES}
    sid = f"general-{index:05d}"
    r, g, b = (int(v) for v in rng.integers(40, 110, size=3))
    images = []
    for name in IMAGE_NAMES:
        path = images_dir / f"{sid}_{name}.png"
        draw(scenes[name], width, height, (r, g, b)).save(path, optimize=False)
        images.append(ImageRef(name, str(path)))
    header = "".join(f"{name}: {IMAGE_PLACEHOLDER}\n" for name in IMAGE_NAMES)
    return Sample(
        id=sid,
        capability="perception",
        question_type=qtype,
        images=images,
        question=header + question,
        answer=answer,
        scene_id=sid,
        choices=choices,
        correct_choice=letter,
        facts=facts,
    )


def generate_general(
    out: str | Path, samples: int, seed: int = 0, *, overwrite: bool = False, width: int = 224, height: int = 128
) -> dict[str, Any]:
    """Write `samples` shape questions to `out/test.jsonl` and `out/images/` (atomically); return counts."""
    out = Path(out)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise DriveKDError(f"--samples must be a positive integer, got {samples!r}")
    if width < 4 * SLOTS or height < 32:
        raise DriveKDError(f"image size {width}x{height} is too small for the shapes (at least {4 * SLOTS}x32)")
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        root = tmp.resolve()  # image paths are absolute while writing, relative to the folder on disk
        images_dir = root / "images"
        images_dir.mkdir()
        made = [make_sample(i, seed, images_dir, width, height) for i in range(samples)]
        with open(root / f"{SPLIT}.jsonl", "w", encoding="utf-8") as f:
            for s in made:
                f.write(json.dumps(s.to_json(image_base=root), ensure_ascii=False, sort_keys=True) + "\n")
    by_type = Counter(s.question_type for s in made)
    return {
        "generator": GENERATOR_VERSION,
        "samples": samples,
        "seed": seed,
        "split": SPLIT,
        "image_size": [width, height],
        "by_question_type": {t: by_type[t] for t in QUESTION_TYPES},
    }
