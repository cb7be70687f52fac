"""How much of a tagged vehicle's colour and lights the pixels under its tag carry, at a given input size.

    python scripts/pixel_ceiling.py OBJECTS_DIR QA_DIR [--size 96x96] [--steps 1500]

A small CNN is trained, with full supervision and the exact tag location, on a window around each
tagged vehicle of OBJECTS_DIR's train split (`drivekd data generate --task objects`: colour and
lights/status of every vehicle within 30 m), after the camera image is resized to SIZE the way a
model's image processor would. It is scored on OBJECTS_DIR's val split (vehicles within 30 m) and on
QA_DIR's val + test `object_colour` / `object_status` items (their tags, their labels, any distance).
A VLM that finds the tag can read at most about what this reads from the same pixels (it also has
context, e.g. drift between lanes, which the window partly cuts off), so a figure here far below a
target says the input resolution, not the training, is the limit.
A diagnostic, not part of the test suite.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from drivekd.data.formats import load_split
from drivekd.data.sample import OBJECT_TAG

WINDOW = 0.25  # of the image width and height: 24 px at 96, a 3 x 3 block of 16-px visual tokens
TASKS = {  # objects question type -> (QA question type, label field)
    "tag_colour": ("object_colour", "attribute"),
    "tag_lights": ("object_status", "status"),
}


def items(folder: Path, split: str, qtype: str, field: str) -> list[tuple[str, float, float, str]]:
    """(image path, tag x, tag y, label) of every `qtype` sample of a split."""
    out = []
    for s in load_split(folder, split):
        if s.question_type != qtype:
            continue
        camera, x, y = OBJECT_TAG.search(s.facts["object"]).groups()
        path = next(im.path for im in s.images if im.camera == camera)
        out.append((path, float(x), float(y), s.facts[field]))
    return out


def windows(rows: list[tuple[str, float, float, str]], size: tuple[int, int]) -> torch.Tensor:
    w, h = size
    cw, ch = max(4, round(WINDOW * w)), max(4, round(WINDOW * h))
    out = np.zeros((len(rows), 3, ch, cw), np.float32)
    loaded, padded = None, np.zeros(0)
    for i, (path, x, y, _) in enumerate(rows):
        if path != loaded:  # items of one scene come together: one image at a time
            img = Image.open(path).convert("RGB").resize((w, h), Image.BICUBIC)
            padded = np.zeros((h + ch, w + cw, 3), np.float32)
            padded[ch // 2 : ch // 2 + h, cw // 2 : cw // 2 + w] = np.asarray(img, np.float32) / 255.0
            loaded = path
        left, top = round(x * w), round(y * h)  # window centred on the tag, in padded coords
        out[i] = padded[top : top + ch, left : left + cw].transpose(2, 0, 1)
    return torch.from_numpy(out)


def cnn(classes: int) -> torch.nn.Module:
    def block(i: int, o: int) -> list[torch.nn.Module]:
        return [torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]

    return torch.nn.Sequential(
        *block(3, 32), *block(32, 32), torch.nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, classes),
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("objects", type=Path)
    ap.add_argument("qa", type=Path)
    ap.add_argument("--size", default="96x96")
    ap.add_argument("--steps", type=int, default=1500)
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    torch.manual_seed(0)
    for qtype, (qa_type, field) in TASKS.items():
        train = items(args.objects, "train", qtype, field)
        tests = {
            "objects val": items(args.objects, "val", qtype, field),
            f"QA val+test {qa_type}": items(args.qa, "val", qa_type, "label")
            + items(args.qa, "test", qa_type, "label"),
        }
        labels = sorted({r[3] for r in train}.union(*({r[3] for r in t} for t in tests.values())))
        x, y = windows(train, size), torch.tensor([labels.index(r[3]) for r in train])
        mean = x.mean((0, 2, 3), keepdim=True)
        model = cnn(len(labels))
        opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=args.steps)
        # classes weighted by inverse frequency: rare indicator classes would otherwise never be predicted
        weight = len(y) / (len(labels) * torch.bincount(y, minlength=len(labels)).clamp(min=1).float())
        model.train()
        for _ in range(args.steps):
            idx = torch.randint(0, len(x), (64,))
            loss = torch.nn.functional.cross_entropy(model(x[idx] - mean), y[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        print(f"{qtype} at {args.size} ({x.shape[-1]} x {x.shape[-2]} px window), {len(train)} train items:")
        for name, test in tests.items():
            xt, yt = windows(test, size), torch.tensor([labels.index(r[3]) for r in test])
            with torch.no_grad():
                pred = model(xt - mean).argmax(1)
            frequent = torch.bincount(yt).max().item() / len(yt)
            per = {labels[c]: f"{(pred[yt == c] == c).float().mean().item():.2f}" for c in yt.unique().tolist()}
            print(
                f"  {name:28s} {len(test):5d} items: accuracy {100 * (pred == yt).float().mean().item():5.1f} "
                f"(most frequent label {100 * frequent:.1f}); recall per class {per}"
            )


if __name__ == "__main__":
    main()
