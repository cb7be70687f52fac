"""The fixed rules that turn the per-layer curves into a recipe (`RULES`, copied into prestudy.json).

Curves in, recommendation out: no model here, so the rules can be read and tested on curves written by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import yaml

from drivekd.data.sample import CAPABILITIES
from drivekd.errors import DriveKDError
from drivekd.eval.prestudy.metrics import json_number

VERSION = "prestudy/2"  # of prestudy.json and its rules; here because recipe.yaml's header names it
FLAT_THRESHOLD = 0.10  # reasoning similarity is "flat" when (max - min) / |mean| over the range is below this
PEAK_TOLERANCE = 0.01  # adjacent cosines within this of the peak count as the peak (plateaus near 1)

RULES: dict[str, str] = {
    "perception": "layer p = argmin of vision_text_cosine over the first half of the layers "
    "(0..ceil(L/2)-1): the layer where vision and text are least aligned (paper: layer 1 = index 0); "
    "signal attn_tv.",
    "planning": "transition l -> l+1 with the highest adjacent_cosine among l = 0..L-3 (the last transition, "
    f"into the final layer, is the outlier and is excluded); within {PEAK_TOLERANCE} of that peak the deepest "
    "transition wins (cosines plateau near 1); planning layer q = l + 1, the layer that ends the most stable "
    "transition (paper: the penultimate layer, index -2); signal attn_tv.",
    "reasoning": f"over the intermediate range [min(p, q), max(p, q)]: if the reasoning intra_group_similarity "
    f"is flat there ((max - min) / |mean| < {FLAT_THRESHOLD}), spread over the range: attn_group with "
    "layers [lo, hi]; otherwise the single layer of highest reasoning similarity in the range, attn_full.",
    "signal": "for each capability, attention when dispersion_attention < dispersion_hidden at the chosen "
    "layer (mean over the range for reasoning), else hidden (same layer or range).",
    "indices": "the recipe names the teacher's layers (teacher_layer / teacher_layers), those in the second "
    "half (l >= L/2) as negative indices (l - L), the others as they are; the student's layers are those at "
    "the same relative depth (last to last, the others spread over the layers before the last), so no "
    "layer the rules choose lands on the student's answer-writing last layer.",
}


def portable_index(layer: int, num_layers: int) -> int:
    """Second-half layers as negative indices (transfer between depths), first-half ones as they are."""
    return layer - num_layers if layer >= num_layers / 2 else layer


def _values(xs: Sequence[float | None], lo: int, hi: int) -> list[tuple[int, float]]:
    return [(i, float(xs[i])) for i in range(lo, hi + 1) if xs[i] is not None and math.isfinite(xs[i])]


def _mean(xs: Sequence[float | None], layers: Sequence[int]) -> float:
    vals = [float(xs[i]) for i in layers if xs[i] is not None]
    return sum(vals) / len(vals) if vals else math.nan


def recommend(curves: dict[str, Any], num_layers: int) -> dict[str, dict[str, Any]]:
    """Apply `RULES` to the per-layer curves: {capability: {kind, layer(s), resolved, reason, ...}}."""
    L = num_layers
    if L < 3:
        raise DriveKDError(f"the pre-study rules need a model with at least 3 LM layers, this one has {L}")
    vt, adj = curves["vision_text_cosine"], curves["adjacent_cosine"]
    disp_h, disp_a = curves["dispersion"]["hidden"], curves["dispersion"]["attention"]
    reasoning_sim = curves["intra_group_similarity"]["reasoning"]

    half = math.ceil(L / 2)
    cands = _values(vt, 0, half - 1)
    if not cands:
        raise DriveKDError("no vision-text cosine in the first half of the layers (no visual or no text tokens?)")
    p, p_val = min(cands, key=lambda iv: iv[1])
    others = [v for i, v in cands if i != p]
    p_reason = (
        f"layer {p} has the weakest vision-text alignment among layers 0-{half - 1} "
        f"(cos {p_val:.3f}; next weakest {min(others):.3f})"
        if others
        else f"layer {p} is the only first-half layer (vision-text cos {p_val:.3f})"
    )

    trans = _values(adj, 0, L - 3)
    if not trans:
        raise DriveKDError("no adjacent-layer cosine before the last transition")
    peak = max(v for _, v in trans)
    l_star = max(i for i, v in trans if v >= peak - PEAK_TOLERANCE)
    q = l_star + 1
    last = adj[L - 2]
    q_reason = (
        f"transition {l_star}->{q} is the most stable before the last one (adjacent cos {adj[l_star]:.3f}, peak "
        f"{peak:.3f}, tolerance {PEAK_TOLERANCE}); the last transition {L - 2}->{L - 1} has cos "
        + (f"{last:.3f}" if last is not None else "n/a")
    )

    lo, hi = min(p, q), max(p, q)
    span = list(range(lo, hi + 1))
    r_vals = _values(reasoning_sim, lo, hi)
    if not r_vals:
        raise DriveKDError("no reasoning intra-group similarity in the intermediate range")
    r_mean = sum(v for _, v in r_vals) / len(r_vals)
    r_range = max(v for _, v in r_vals) - min(v for _, v in r_vals)
    rel = r_range / abs(r_mean) if r_mean != 0 else math.inf
    flat = rel < FLAT_THRESHOLD
    if flat:
        r_layers = span
        r_reason = (
            f"reasoning similarity is flat over layers {lo}-{hi} (relative range {rel:.3f} < {FLAT_THRESHOLD}, "
            f"mean {r_mean:.3f}): spread over the range"
        )
    else:
        best, best_val = max(r_vals, key=lambda iv: iv[1])
        r_layers = [best]
        r_reason = (
            f"reasoning similarity varies over layers {lo}-{hi} (relative range {rel:.3f} >= {FLAT_THRESHOLD}): "
            f"layer {best} has the highest ({best_val:.3f})"
        )

    out = {}
    for cap, layers, reason, attn_kind in (
        ("perception", [p], p_reason, "attn_tv"),
        ("reasoning", r_layers, r_reason, "attn_group" if flat else "attn_full"),
        ("planning", [q], q_reason, "attn_tv"),
    ):
        da, dh = _mean(disp_a, layers), _mean(disp_h, layers)
        use_attention = not (math.isfinite(da) and math.isfinite(dh)) or da < dh
        where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
        signal_reason = (
            f"attention dispersion {da:.3f} {'<' if use_attention else '>='} hidden dispersion {dh:.3f} at {where}"
        )
        kind = attn_kind if use_attention else "hidden"
        entry: dict[str, Any] = {"kind": kind}
        if cap == "reasoning" and flat:
            entry["teacher_layers"] = [portable_index(layers[0], L), portable_index(layers[-1], L)]
        else:
            entry["teacher_layer"] = portable_index(layers[0], L)
        entry["resolved_layers"] = layers
        entry["reason"] = f"{reason}; {signal_reason} -> {kind}"
        entry["dispersion"] = {"attention": json_number(da), "hidden": json_number(dh)}
        out[cap] = entry
    return out


def recipe_of(recommendation: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The recipe YAML's content: {capability: {kind, teacher_layer | teacher_layers}}."""
    recipe = {}
    for cap in CAPABILITIES:
        entry = recommendation[cap]
        recipe[cap] = {k: entry[k] for k in ("kind", "teacher_layer", "teacher_layers") if k in entry}
    return recipe


def recipe_yaml(result: dict[str, Any]) -> str:
    lines = [
        f"# Recommended by `drivekd prestudy` ({VERSION}) for {result['model']} on {result['data']} "
        f"(split {result['split']}, {result['samples']['driving']} samples).",
    ]
    for cap in CAPABILITIES:
        lines.append(f"# {cap}: {result['recommendation'][cap]['reason']}".replace("\n", " "))
    for cap in CAPABILITIES:
        body = yaml.safe_dump({cap: result["recipe"][cap]}, default_flow_style=None, sort_keys=False).strip()
        lines.append(body)
    return "\n".join(lines) + "\n"
