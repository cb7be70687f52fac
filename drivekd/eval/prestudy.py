"""The Drive-KD pre-study (method doc §6, paper Fig. 2): which layer and signal carries each capability.

Four layer-wise analyses of one model on driving data (and a general control set), then fixed
rules that turn them into a recipe (`recipe.yaml`, the schema of `drivekd/distill/recipes/`):

(a) adjacent-layer cosine of hidden states, and within-layer vision-text cosine;
(b) capability-wise intra-group similarity of per-sample representations;
(c) dispersion `1 - cos` across samples of hidden states vs text->vision attention profiles;
(d) position-normalised generalised margin along the answer (logit lens at every layer).

The metric functions are pure functions over tensors (tested against explicit loops); `collect`
runs the model batch by batch and keeps per-sample statistics; `recommend` applies the rules to
the per-layer curves; `run_prestudy` writes `prestudy.json`, `prestudy.png` and `recipe.yaml`.
The exact formulas are in `DEFINITIONS` and `RULES` below (copied into the JSON) and in
docs/prestudy.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from drivekd.atomic import atomic_file
from drivekd.data.sample import CAPABILITIES, Sample
from drivekd.errors import DataError, DriveKDError

VERSION = "prestudy/1"
BINS = 10
FLAT_THRESHOLD = 0.10  # reasoning similarity is "flat" when (max - min) / |mean| over the range is below this
PEAK_TOLERANCE = 0.01  # adjacent cosines within this of the peak count as the peak (plateaus near 1)
IGNORE_INDEX = -100

DEFINITIONS: dict[str, str] = {
    "layers": "LM layer l = 0..L-1 is the output of decoder layer l: hidden_states[l + 1] from "
    "output_hidden_states=True for l < L-1, and for l = L-1 the last decoder layer's raw output (a forward "
    "hook; hidden_states[L] has the final norm applied). Tokens: valid = attention_mask, visual = "
    "visual-token positions, text = valid and not visual.",
    "adjacent_cosine": "a[l] = mean over samples of (mean over the sample's valid tokens t of "
    "cos(h_l[t], h_{l+1}[t])), l = 0..L-2; a[L-1] = null (no next layer).",
    "vision_text_cosine": "vt[l] = mean over samples of cos(mean_{t visual} h_l[t], mean_{t text} h_l[t]).",
    "intra_group_similarity": "per-sample representation r_l(x) = mean of h_l over x's valid tokens; "
    "s_c[l] = mean over ordered pairs x != y of capability c of cos(r_l(x), r_l(y)).",
    "dispersion_hidden": "d_h[l] = 1 - mean over pairs x != y of cos(u_l(x), u_l(y)), u_l(x) = mean of h_l "
    "over x's text tokens (the rows the attention profile averages over); uncentred.",
    "dispersion_attention": "d_a[l] = 1 - mean over pairs x != y of cos(p_l(x), p_l(y)), p_l(x)[j] = mean over "
    "x's text rows i of A_l[i, v_j], A_l the head-mean attention of layer l, v_j the j-th visual position "
    "(a vector of length = visual tokens per sample, the same for every sample of a dataset).",
    "dispersion_comparability": "both are 1 - mean pairwise cosine of one fixed-length vector per sample, "
    "summarising the same text rows of layer l; cosine ignores scale, so neither the growth of hidden-state "
    "norms with depth nor attention rows summing to 1 matters, and both lie in [0, 2] (attention profiles "
    "are non-negative, so d_a lies in [0, 1]). Uncentred, because centred vectors have mean pairwise cosine "
    "-1/(n-1) whatever the data.",
    "margin": "logit lens z_l = lm_head(final_norm(h_l)); p = softmax(z_l / tau) at the position before "
    "each answer token (labels shifted by one, as in the causal-LM loss); margin = p(y_t) - max_{v != y_t} "
    "p(v), in [-1, 1]. Answer target k of n in a sample falls in bin floor(10 k / n) (0..9, relative "
    "position along the answer, its closing <|im_end|> included). by_bin[l][b] = mean over all answer "
    "tokens in bin b (null if none); mean[l] = mean over all answer tokens.",
}

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
    "indices": "layers in the second half (l >= L/2) are written as negative indices (l - L) so the recipe "
    "transfers between depths; the others as they are.",
}


# ---- pure metric functions -------------------------------------------------------------------
def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the last dimension (0 where a vector is zero)."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, T) bool -> (B, D): mean of x over the masked positions of each row."""
    m = mask.to(torch.float32)
    return (x.float() * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)


def token_cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D) x 2, (B, T) bool -> (B,): per sample, mean over masked tokens of cos(a[t], b[t])."""
    m = mask.to(torch.float32)
    return (_cos(a, b) * m).sum(1) / m.sum(1).clamp_min(1.0)


def adjacent_cosine(hiddens: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """L hidden states (B, T, D) -> (B, L-1): per sample, token-mean cos(h_l, h_{l+1})."""
    return torch.stack([token_cosine(hiddens[i], hiddens[i + 1], mask) for i in range(len(hiddens) - 1)], dim=1)


def vision_text_cosine(hidden: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (B,): cos(mean visual-token hidden, mean text-token hidden) per sample."""
    return _cos(masked_mean(hidden, visual & valid), masked_mean(hidden, valid & ~visual))


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """(N, D), N >= 2 -> mean of cos(x_i, x_j) over ordered pairs i != j (self pairs excluded)."""
    n = x.shape[0]
    if n < 2:
        return math.nan
    unit = torch.nn.functional.normalize(x.double(), dim=-1, eps=1e-12)
    gram = unit @ unit.T
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def tv_profile(attn: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T, T) head-mean attention -> (B, V): mean over text rows of the attention to each visual column.

    Every sample must hold the same number V of visual tokens.
    """
    rows = (valid & ~visual).to(torch.float32)
    summed = torch.einsum("bt,bts->bs", rows, attn.float()) / rows.sum(1, keepdim=True).clamp_min(1.0)
    counts = (visual & valid).sum(1)
    if (counts != counts[0]).any():
        raise DataError(f"attention profiles need the same number of visual tokens per sample, got {counts.tolist()}")
    return summed[visual & valid].view(attn.shape[0], int(counts[0]))


def answer_targets(labels: torch.Tensor, bins: int = BINS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T) labels -> `positions` (N, 2), `targets` (N,), `bin` (N,) over the N answer tokens.

    `positions` holds (b, t) of the logits that predict each answer token (t = its position - 1, the
    causal-LM shift); `bin` is floor(bins * k / n) for answer target k of n in its sample.
    """
    shifted = labels[:, 1:]
    is_answer = shifted != IGNORE_INDEX
    b, t = is_answer.nonzero(as_tuple=True)
    k = torch.cumsum(is_answer.long(), dim=1)[b, t] - 1
    n = is_answer.sum(1)[b]
    bin_index = torch.div(bins * k, n.clamp_min(1), rounding_mode="floor")
    return torch.stack([b, t], dim=1), shifted[b, t], bin_index


def token_margins(logits: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """(N, V) logits, (N,) targets -> (N,): p_tau(y) - max_{v != y} p_tau(v)."""
    p = torch.softmax(logits.float() / tau, dim=-1)
    true = p.gather(1, targets[:, None]).squeeze(1)
    rest = p.scatter(1, targets[:, None], -1.0).max(dim=1).values
    return true - rest


def margin_bins(
    logits: torch.Tensor, labels: torch.Tensor, tau: float, bins: int = BINS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V) logits, (B, T) labels -> per-bin (sum of margins, token count), each (bins,)."""
    pos, targets, bin_index = answer_targets(labels, bins)
    margins = token_margins(logits[pos[:, 0], pos[:, 1]], targets, tau)
    sums = torch.zeros(bins, dtype=torch.float64).index_add_(0, bin_index, margins.double())
    counts = torch.zeros(bins, dtype=torch.float64).index_add_(
        0, bin_index, torch.ones_like(margins, dtype=torch.float64)
    )
    return sums, counts


# ---- the model side --------------------------------------------------------------------------
def _language_model(backend: Any) -> torch.nn.Module:
    model = backend.model
    inner = model.model if hasattr(model, "model") else model
    return inner.language_model if hasattr(inner, "language_model") else inner


def logit_lens(backend: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """h (..., D) -> logits (..., V): the LM's final norm, then its output head (both families)."""
    norm = _language_model(backend).norm
    head = backend.model.get_output_embeddings()
    return lambda h: head(norm(h.to(head.weight.dtype)))


@dataclass
class Collected:
    """Per-sample statistics of one dataset, layer by layer."""

    num_layers: int
    capabilities: list[str] = field(default_factory=list)
    adjacent: list[torch.Tensor] = field(default_factory=list)  # (B, L-1) per batch
    vision_text: list[torch.Tensor] = field(default_factory=list)  # (B, L)
    pooled: list[torch.Tensor] = field(default_factory=list)  # (B, L, D): mean over valid tokens
    text_pooled: list[torch.Tensor] = field(default_factory=list)  # (B, L, D): mean over text tokens
    profiles: list[torch.Tensor] = field(default_factory=list)  # (B, L, V)
    margin_sums: torch.Tensor | None = None  # (L, bins)
    margin_counts: torch.Tensor | None = None  # (L, bins)


def collect(backend: Any, samples: Sequence[Sample], batch_size: int, tau: float, *, full: bool = True) -> Collected:
    """Run the model over `samples`; `full=False` collects the margins only (the general set)."""
    from drivekd.distill.capture import capture

    L = backend.num_layers
    out = Collected(L)
    out.margin_sums = torch.zeros(L, BINS, dtype=torch.float64)
    out.margin_counts = torch.zeros(L, BINS, dtype=torch.float64)
    lens = logit_lens(backend)
    last_layer = _language_model(backend).layers[-1]
    visual_counts: dict[int, str] = {}
    backend.model.eval()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = backend.build_batch(chunk).to(backend.device)
        valid = batch.inputs["attention_mask"].bool()
        visual = batch.visual_mask & valid
        for s, n in zip(chunk, visual.sum(1).tolist(), strict=True):
            visual_counts.setdefault(int(n), s.id)
        if full and len(visual_counts) > 1:
            (n1, id1), (n2, id2) = list(visual_counts.items())[:2]
            raise DataError(
                f"sample {id2}: {n2} visual tokens but sample {id1} has {n1}: attention profiles need the "
                "same number in every sample (same image sizes)"
            )
        raw: dict[str, torch.Tensor] = {}

        def keep_raw(_module: torch.nn.Module, _inputs: object, output: object, raw: dict = raw) -> None:
            raw["last"] = output[0] if isinstance(output, tuple) else output

        hook = last_layer.register_forward_hook(keep_raw)
        try:
            with torch.no_grad(), capture(backend, list(range(L))) if full else contextlib.nullcontext({}) as maps:
                result = backend.model(**batch.inputs, output_hidden_states=True)
        finally:
            hook.remove()
        hiddens = [*result.hidden_states[1:L], raw["last"]]
        with torch.no_grad():
            pos, targets, bin_index = answer_targets(batch.labels, BINS)
            for layer, h in enumerate(hiddens):
                margins = token_margins(lens(h[pos[:, 0], pos[:, 1]]), targets, tau).double().cpu()
                out.margin_sums[layer].index_add_(0, bin_index.cpu(), margins)
                out.margin_counts[layer].index_add_(0, bin_index.cpu(), torch.ones_like(margins))
            if full:
                out.capabilities.extend(batch.capabilities)
                out.adjacent.append(adjacent_cosine(hiddens, valid).cpu())
                out.vision_text.append(torch.stack([vision_text_cosine(h, visual, valid) for h in hiddens], 1).cpu())
                out.pooled.append(torch.stack([masked_mean(h, valid) for h in hiddens], 1).cpu())
                out.text_pooled.append(torch.stack([masked_mean(h, valid & ~visual) for h in hiddens], 1).cpu())
                out.profiles.append(torch.stack([tv_profile(maps[i], visual, valid) for i in range(L)], 1).cpu())
        del result, hiddens, maps, raw
    return out


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def margin_curves(c: Collected) -> dict[str, Any]:
    assert c.margin_sums is not None and c.margin_counts is not None
    by_bin = torch.where(c.margin_counts > 0, c.margin_sums / c.margin_counts.clamp_min(1), math.nan)
    mean = c.margin_sums.sum(1) / c.margin_counts.sum(1).clamp_min(1)
    mean = torch.where(c.margin_counts.sum(1) > 0, mean, math.nan)
    return {
        "by_bin": [[_num(v) for v in row.tolist()] for row in by_bin],
        "mean": [_num(v) for v in mean.tolist()],
        "tokens": int(c.margin_counts[0].sum().item()),
    }


def analyse(driving: Collected, general: Collected | None) -> dict[str, Any]:
    """Per-layer curves (lists of length L; null where undefined) from collected statistics."""
    L = driving.num_layers
    adjacent = [*torch.cat(driving.adjacent).mean(0).tolist(), math.nan]
    vision_text = torch.cat(driving.vision_text).mean(0).tolist()
    pooled = torch.cat(driving.pooled)
    text_pooled = torch.cat(driving.text_pooled)
    profiles = torch.cat(driving.profiles)
    caps = driving.capabilities
    intra = {}
    for cap in CAPABILITIES:
        idx = torch.tensor([i for i, c in enumerate(caps) if c == cap], dtype=torch.long)
        intra[cap] = [_num(mean_pairwise_cosine(pooled[idx, layer])) for layer in range(L)]
    return {
        "adjacent_cosine": [_num(v) for v in adjacent],
        "vision_text_cosine": [_num(v) for v in vision_text],
        "intra_group_similarity": intra,
        "dispersion": {
            "hidden": [_num(1 - mean_pairwise_cosine(text_pooled[:, layer])) for layer in range(L)],
            "attention": [_num(1 - mean_pairwise_cosine(profiles[:, layer])) for layer in range(L)],
        },
        "margin": {
            "driving": margin_curves(driving),
            "general": margin_curves(general) if general is not None else None,
        },
    }


# ---- rules -----------------------------------------------------------------------------------
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
            entry["layers"] = [portable_index(layers[0], L), portable_index(layers[-1], L)]
        else:
            entry["layer"] = portable_index(layers[0], L)
        entry["resolved_layers"] = layers
        entry["reason"] = f"{reason}; {signal_reason} -> {kind}"
        entry["dispersion"] = {"attention": _num(da), "hidden": _num(dh)}
        out[cap] = entry
    return out


def recipe_of(recommendation: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The recipe YAML's content: {capability: {kind, layer | layers}}."""
    recipe = {}
    for cap in CAPABILITIES:
        entry = recommendation[cap]
        recipe[cap] = {k: entry[k] for k in ("kind", "layer", "layers") if k in entry}
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


# ---- driver ----------------------------------------------------------------------------------
def select_samples(samples: Sequence[Sample], max_samples: int) -> list[Sample]:
    """Up to `max_samples`, taken round-robin over capabilities in file order (balanced, deterministic)."""
    queues = {c: [s for s in samples if s.capability == c] for c in CAPABILITIES}
    out: list[Sample] = []
    k = 0
    while len(out) < max_samples and any(k < len(q) for q in queues.values()):
        for c in CAPABILITIES:
            if k < len(queues[c]) and len(out) < max_samples:
                out.append(queues[c][k])
        k += 1
    return out


def _load(directory: Path, split: str, what: str) -> list[Sample]:
    from drivekd.data.formats import load_split
    from drivekd.data.validate import validate_samples

    if not directory.is_dir():
        raise DataError(f"{directory}: no such {what} folder")
    samples = load_split(directory, split)
    if not samples:
        raise DataError(f"{directory}: {split}.jsonl holds no samples")
    validate_samples(samples).raise_if_bad(str(directory / f"{split}.jsonl"))
    return samples


def general_split(general_dir: Path, split: str) -> str:
    """The general control set is read from its `test` split (all `drivekd data general` writes), else `split`."""
    return "test" if (general_dir / "test.jsonl").is_file() else split


def run_prestudy(
    model: str,
    data_dir: Path,
    out: Path,
    *,
    general_dir: Path | None = None,
    split: str = "val",
    max_samples: int = 96,
    batch_size: int = 8,
    tau: float = 1.0,
) -> dict:
    """Run the four analyses, apply the rules, write OUT/prestudy.json, prestudy.png and recipe.yaml.

    Arguments and data are checked before the model is loaded; every problem is a DriveKDError.
    """
    started = time.perf_counter()
    data_dir, out = Path(data_dir), Path(out)
    if max_samples < 2:
        raise DriveKDError(f"--max-samples must be at least 2 (pairwise similarities), got {max_samples}")
    if batch_size < 1:
        raise DriveKDError(f"--batch must be at least 1, got {batch_size}")
    if not (tau > 0 and math.isfinite(tau)):
        raise DriveKDError(f"--tau must be a positive number, got {tau}")
    if out.exists() and not out.is_dir():
        raise DriveKDError(f"{out}: exists and is not a folder")
    samples = select_samples(_load(data_dir, split, "dataset"), max_samples)
    counts = {c: sum(s.capability == c for s in samples) for c in CAPABILITIES}
    short = [c for c, n in counts.items() if n < 2]
    if short:
        raise DataError(
            f"{data_dir / (split + '.jsonl')}: capability {short[0]} has {counts[short[0]]} sample(s) among the "
            f"{len(samples)} used; intra-group similarity needs at least 2 of each"
        )
    general: list[Sample] | None = None
    g_split = None
    if general_dir is not None:
        general_dir = Path(general_dir)
        if not general_dir.is_dir():
            raise DataError(f"{general_dir}: no such general dataset folder")
        g_split = general_split(general_dir, split)
        general = list(_load(general_dir, g_split, "general dataset")[:max_samples])

    from drivekd.eval.prestudy_plot import save_figure
    from drivekd.models.loading import LoadOptions, load_backend

    cuda = torch.cuda.is_available()
    options = LoadOptions(dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu")
    backend = load_backend(model, options)
    L = backend.num_layers
    if L < 3:
        raise DriveKDError(f"{model}: the pre-study needs at least 3 LM layers, this model has {L}")
    driving_stats = collect(backend, samples, batch_size, tau)
    general_stats = collect(backend, general, batch_size, tau, full=False) if general else None
    curves = analyse(driving_stats, general_stats)
    recommendation = recommend(curves, L)
    result: dict[str, Any] = {
        "version": VERSION,
        "model": str(model),
        "family": backend.family,
        "num_layers": L,
        "data": str(data_dir),
        "split": split,
        "general": str(general_dir) if general_dir is not None else None,
        "general_split": g_split,
        "samples": {"driving": len(samples), "by_capability": counts, "general": len(general) if general else None},
        "tau": tau,
        "bins": BINS,
        "batch_size": batch_size,
        "device": options.device,
        "dtype": options.dtype,
        "definitions": DEFINITIONS,
        "rules": RULES,
        "thresholds": {"flat": FLAT_THRESHOLD, "peak_tolerance": PEAK_TOLERANCE},
        "layers": curves,
        "recommendation": recommendation,
        "recipe": recipe_of(recommendation),
        "outputs": {
            "json": str(out / "prestudy.json"),
            "figure": str(out / "prestudy.png"),
            "recipe": str(out / "recipe.yaml"),
        },
    }
    result["seconds"] = round(time.perf_counter() - started, 2)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "recipe.yaml") as tmp:
        tmp.write_text(recipe_yaml(result), encoding="utf-8")
    with atomic_file(out / "prestudy.png") as tmp:
        save_figure(result, tmp)
    with atomic_file(out / "prestudy.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return result


def summary_markdown(result: dict[str, Any]) -> str:
    """A short report: the recommended signal per capability, and the files written."""
    n = result["num_layers"]
    lines = [
        f"Pre-study of {result['model']} ({result['family']}, {n} LM layers) on {result['data']} "
        f"(split {result['split']}, {result['samples']['driving']} samples"
        + (f"; general {result['general']}, {result['samples']['general']} samples" if result["general"] else "")
        + f") in {result['seconds']:.1f} s",
        "",
        "| capability | signal | layer(s) | reason |",
        "|---|---|---|---|",
    ]
    for cap in CAPABILITIES:
        r = result["recommendation"][cap]
        where = r["layers"] if "layers" in r else r["layer"]
        resolved = r["resolved_layers"]
        shown = f"{where} (= {resolved[0]}" + (f"..{resolved[-1]})" if len(resolved) > 1 else ")")
        lines.append(f"| {cap} | {r['kind']} | {shown} | {r['reason']} |")
    lines += ["", "wrote " + ", ".join(result["outputs"].values())]
    return "\n".join(lines)
