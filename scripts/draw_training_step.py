"""Draw one Drive-KD distillation step, with the drivekd file that does each part.

    python scripts/draw_training_step.py                  # writes docs/training-step.png
    python scripts/draw_training_step.py --out step.png

Needs matplotlib (the `sim` extra: `pip install -e '.[sim]'`). The picture is the README's
"One training step"; edit the boxes below and rerun this script to change it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "training-step.png"

# Colours by who owns a step: the batch, the student, the teacher, the gradients.
DATA, STUDENT, TEACHER, GRADIENT, NOTE = "#eeeeee", "#dbe9f6", "#fde4cc", "#dcf0dc", "#ffffff"
FILE_COLOUR = "#444444"

# (key, centre x, centre y, width, height, fill, title, detail, drivekd file); coordinates in 0..100
H = 11  # every box's height
BOXES = [
    ("batch", 50, 96, 46, H, DATA, "Batch", "camera images + question + answer", "data/ · models/backend.py"),
    (
        "student",
        23,
        76,
        42,
        H,
        STUDENT,
        "Student forward",
        "captures only the maps the recipe names",
        "models/capture.py",
    ),
    (
        "teacher",
        77,
        76,
        42,
        H,
        TEACHER,
        "Teacher maps",
        "a live forward, or read from the teacher cache",
        "distill/teachers.py + cache.py",
    ),
    ("ce", 14, 56, 26, H, STUDENT, "CE loss", "on the answer tokens (the anchor)", "distill/engine.py"),
    (
        "signals",
        62,
        56,
        64,
        H,
        TEACHER,
        "Signal losses: perception, reasoning, planning",
        "distance(student map, teacher map) × mixing[sample's capability] × weight",
        "distill/signals.py + engine.py",
    ),
    (
        "grads",
        36,
        36,
        62,
        H,
        GRADIENT,
        "Task gradients: g_ce, g_perception, g_reasoning, g_planning",
        "one backward per loss, into one (k × P) buffer",
        "distill/aggregate.py",
    ),
    ("calib", 85, 36, 26, H, NOTE, "Loss weights", "shares of CE, set before step 1", "distill/calibrate.py"),
    (
        "gram",
        18,
        16,
        34,
        H,
        GRADIENT,
        "Gram matrix G = g gᵀ",
        "k × k dot products, any model size",
        "distill/aggregate.py",
    ),
    (
        "combine",
        70,
        16,
        50,
        H,
        GRADIENT,
        "Strategy: coefficients w = f(G)",
        "sum · PCGrad · AGP (CE kept, conflicting signals projected)",
        "distill/combine.py",
    ),
    (
        "step",
        50,
        -4,
        50,
        H,
        DATA,
        "Optimiser step",
        "p.grad = Σ wᵢ gᵢ, then AdamW",
        "distill/aggregate.py → train/trainer.py",
    ),
]

# (from, to, dashed)
ARROWS = [
    ("batch", "student", False),
    ("batch", "teacher", False),
    ("student", "ce", False),
    ("student", "signals", False),
    ("teacher", "signals", False),
    ("ce", "grads", False),
    ("signals", "grads", False),
    ("calib", "signals", True),
    ("grads", "gram", False),
    ("gram", "combine", False),
    ("combine", "step", False),
]


def _ends(a: tuple, b: tuple) -> tuple[tuple[float, float], tuple[float, float]]:
    """Where an arrow from box `a` to box `b` starts and ends: straight down (or up) through the
    middle of the two boxes' shared x range when they share one, else side to side."""
    _, xa, ya, wa, ha = a[:5]
    _, xb, yb, wb, hb = b[:5]
    lo, hi = max(xa - wa / 2, xb - wb / 2), min(xa + wa / 2, xb + wb / 2)
    gap = 1.2
    if hi - lo > 4:  # overlapping in x: a vertical arrow
        x = (lo + hi) / 2
        if ya > yb:
            return (x, ya - ha / 2 - gap), (x, yb + hb / 2 + gap)
        return (x, ya + ha / 2 + gap), (x, yb - hb / 2 - gap)
    if abs(ya - yb) < 1e-6:  # same row: a horizontal arrow
        if xa < xb:
            return (xa + wa / 2 + gap, ya), (xb - wb / 2 - gap, yb)
        return (xa - wa / 2 - gap, ya), (xb + wb / 2 + gap, yb)
    return (xa, ya - ha / 2 - gap), (xb, yb + hb / 2 + gap)


def draw(out: Path) -> Path:
    """Draw the step and write it to `out` (PNG); returns `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(12, 10), dpi=110)
    ax.set_xlim(0, 100)
    ax.set_ylim(-11, 108)
    ax.axis("off")
    boxes = {b[0]: b for b in BOXES}
    for key, x, y, w, h, fill, title, detail, file in BOXES:
        ax.add_patch(
            FancyBboxPatch(
                (x - w / 2, y - h / 2),
                w,
                h,
                boxstyle="round,pad=0.4,rounding_size=1.2",
                facecolor=fill,
                edgecolor="#555555",
                linewidth=1.0,
                linestyle="--" if key == "calib" else "-",
            )
        )
        lines = [
            (title, 11.5, "bold", "sans-serif", "black"),
            (detail, 9.5, "normal", "sans-serif", "black"),
            (file, 9, "normal", "monospace", FILE_COLOUR),
        ]
        step = h / 3.4
        for i, (text, size, weight, family, colour) in enumerate(lines):
            ax.text(
                x,
                y + step * (1 - i),
                text,
                ha="center",
                va="center",
                fontsize=size,
                fontweight=weight,
                family=family,
                color=colour,
            )
    for a, b, dashed in ARROWS:
        start, end = _ends(boxes[a], boxes[b])
        ax.add_patch(
            FancyArrowPatch(
                start,
                end,
                arrowstyle="-|>",
                mutation_scale=16,
                linewidth=1.3,
                color="#333333",
                linestyle="--" if dashed else "-",
            )
        )
    ax.text(0, 106, "One Drive-KD distillation step", fontsize=14, fontweight="bold", va="center")
    ax.text(0, 102, "file names are under drivekd/", fontsize=9, va="center", color=FILE_COLOUR, family="monospace")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    out = draw(args.out)
    print(out)
    return out


if __name__ == "__main__":
    main()
