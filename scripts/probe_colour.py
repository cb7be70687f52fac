"""Linear colour probe on a model's visual tokens: does the image carry what the LM fails to say?

    python scripts/probe_colour.py MODEL CAPTIONS_DIR

CAPTIONS_DIR is a `drivekd data generate --task captions` folder. For every CAM_FRONT vehicle under
30 m in its captions, the visual token under the vehicle's tag (x, y) is taken from the model's
projector output, and a linear classifier is fit on train and scored on test. The same probe at the
transposed token and on the image mean are controls. An InternVL-family diagnostic (one tile, a
square token grid in raster order); not part of the test suite.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import torch
from PIL import Image

from drivekd.models.backend import VLMBackend
from drivekd.models.loading import load_backend

COLOURS = ["white", "black", "blue", "green", "red", "yellow"]
NEAR_FRONT = re.compile(r"<c\d+,CAM_FRONT,([\d.]+),([\d.]+)> (\w+) \w+, (\d+) m ahead")


def vehicles(folder: Path, split: str, limit: int) -> list[tuple[Path, float, float, int]]:
    out = []
    for line in (folder / f"{split}.jsonl").open(encoding="utf-8"):
        sample = json.loads(line)
        for m in NEAR_FRONT.finditer(sample["answer"]):
            if int(m.group(4)) < 30 and m.group(3) in COLOURS:
                out.append(
                    (
                        folder / sample["images"][0]["path"],
                        float(m.group(1)),
                        float(m.group(2)),
                        COLOURS.index(m.group(3)),
                    )
                )
        if len(out) >= limit:
            break
    return out


@torch.no_grad()
def features(backend: VLMBackend, items: list[tuple[Path, float, float, int]]) -> dict[str, torch.Tensor]:
    found: dict[str, list[torch.Tensor]] = {"token under the tag": [], "transposed token": [], "image mean": []}
    for i in range(0, len(items), 64):
        chunk = items[i : i + 64]
        pixels, _ = backend.image_inputs([Image.open(p).convert("RGB") for p, *_ in chunk])
        tokens = backend.model.model.get_image_features(
            pixel_values=pixels["pixel_values"], vision_feature_layer=-1, vision_feature_select_strategy="default"
        )
        tokens = getattr(tokens, "pooler_output", tokens)
        side = math.isqrt(tokens.shape[1])
        grid = tokens.view(len(chunk), side, side, -1)
        for k, (_, x, y, _) in enumerate(chunk):
            row, col = min(int(y * side), side - 1), min(int(x * side), side - 1)
            found["token under the tag"].append(grid[k, row, col])
            found["transposed token"].append(grid[k, col, row])
            found["image mean"].append(grid[k].mean((0, 1)))
    return {k: torch.stack(v) for k, v in found.items()}


def main(model: str, folder: str) -> None:
    torch.manual_seed(0)
    backend = load_backend(model)
    backend.model.eval()
    train, test = vehicles(Path(folder), "train", 2500), vehicles(Path(folder), "test", 400)
    y_train, y_test = torch.tensor([v[3] for v in train]), torch.tensor([v[3] for v in test])
    f_train, f_test = features(backend, train), features(backend, test)
    majority = (y_test == y_test.mode().values).float().mean().item()
    print(f"{model}: {len(train)} train / {len(test)} test vehicles, majority colour {majority:.2f}")
    for name in f_train:
        mu, sd = f_train[name].mean(0), f_train[name].std(0) + 1e-6
        a, b = (f_train[name] - mu) / sd, (f_test[name] - mu) / sd
        probe = torch.nn.Linear(a.shape[1], len(COLOURS))
        opt = torch.optim.Adam(probe.parameters(), 1e-2, weight_decay=1e-3)
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(probe(a), y_train).backward()
            opt.step()
        print(f"  {name:20s} test {(probe(b).argmax(1) == y_test).float().mean().item():.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
