"""The pre-study figure (paper Fig. 2's four panels) from `prestudy.json`'s content.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch), so it
runs headless and next to any other matplotlib user in the process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120
_NAN = float("nan")


def _series(values: list[float | None]) -> list[float]:
    return [_NAN if v is None else float(v) for v in values]


def _margin_layers(num_layers: int, recommendation: dict[str, Any]) -> list[int]:
    """Up to five layers to draw in (d): first, middle, the chosen ones, last."""
    chosen = {num_layers // 2, num_layers - 1, 0}
    for entry in recommendation.values():
        chosen.update(entry.get("resolved_layers", [])[:1] + entry.get("resolved_layers", [])[-1:])
    return sorted(chosen)[:6]


def save_figure(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Four panels (a)-(d), layer on the x axis of (a)-(c); PNG at DPI dots per inch."""
    layers = result["layers"]
    n = int(result["num_layers"])
    x = list(range(n))
    fig = Figure(figsize=(13, 9), layout="constrained")
    FigureCanvasAgg(fig)
    (ax_a, ax_b), (ax_c, ax_d) = fig.subplots(2, 2)
    model = "/".join(Path(str(result["model"])).parts[-2:])
    fig.suptitle(f"Pre-study: {model} ({n} LM layers), {result['samples']['driving']} driving samples")

    ax_a.plot(x, _series(layers["adjacent_cosine"]), marker="o", label="adjacent layers cos(h_l, h_l+1)")
    ax_a.plot(x, _series(layers["vision_text_cosine"]), marker="s", label="vision-text cos within layer")
    ax_a.set_title("(a) layer-wise alignment")
    ax_a.set_ylabel("cosine")

    for cap, values in layers["intra_group_similarity"].items():
        ax_b.plot(x, _series(values), marker="o", label=cap)
    ax_b.set_title("(b) capability-wise intra-group similarity")
    ax_b.set_ylabel("mean pairwise cosine")

    ax_c.plot(x, _series(layers["dispersion"]["hidden"]), marker="o", label="hidden states")
    ax_c.plot(x, _series(layers["dispersion"]["attention"]), marker="s", label="attention (text->vision)")
    ax_c.set_title("(c) dispersion across samples")
    ax_c.set_ylabel("1 - mean pairwise cosine")

    rec = result.get("recommendation", {})
    for cap, colour in (("perception", "tab:green"), ("planning", "tab:red")):
        for layer in rec.get(cap, {}).get("resolved_layers", [])[:1]:
            ax_a.axvline(layer, color=colour, alpha=0.5, linestyle=":", label=f"{cap} layer")
    for ax in (ax_a, ax_b, ax_c):
        ax.set_xlabel("LM layer")
        ax.set_xticks(x if n <= 32 else x[:: max(1, n // 16)])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    bins = int(result["bins"])
    centres = [(b + 0.5) / bins for b in range(bins)]
    margin = layers["margin"]
    cmap = matplotlib.colormaps["viridis"]
    shown = _margin_layers(n, rec)
    for k, layer in enumerate(shown):
        colour = cmap(0.9 * k / max(1, len(shown) - 1))
        ax_d.plot(
            centres, _series(margin["driving"]["by_bin"][layer]), color=colour, marker="o", label=f"L{layer} driving"
        )
        if margin.get("general") is not None:
            ax_d.plot(
                centres,
                _series(margin["general"]["by_bin"][layer]),
                color=colour,
                linestyle="--",
                marker="x",
                label=f"L{layer} general",
            )
    ax_d.set_title(f"(d) generalised margin along the answer (tau={result['tau']})")
    ax_d.set_xlabel("relative position in the answer")
    ax_d.set_ylabel("p(y) - max other p")
    ax_d.set_xlim(0, 1)
    ax_d.grid(alpha=0.3)
    ax_d.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=DPI, format="png")
