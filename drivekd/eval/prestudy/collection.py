"""The model side of the pre-study: run a backend over samples, then reduce to per-layer curves.

`DEFINITIONS` says what each curve is (copied into prestudy.json); the arithmetic is in `metrics`.
Apart from the rules so that the curves exist, and can be checked, without a recommendation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from drivekd.data.sample import CAPABILITIES, Sample
from drivekd.errors import DataError
from drivekd.eval.prestudy.metrics import (
    BINS,
    adjacent_cosine,
    answer_targets,
    json_number,
    masked_mean,
    mean_pairwise_cosine,
    token_margins,
    tv_profile,
    vision_text_cosine,
)

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


def logit_lens(backend: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """h (..., D) -> logits (..., V): the LM's final norm, then its output head (both families)."""
    norm = backend.language_model.norm
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
    from drivekd.models.capture import capture

    L = backend.num_layers
    out = Collected(L)
    out.margin_sums = torch.zeros(L, BINS, dtype=torch.float64)
    out.margin_counts = torch.zeros(L, BINS, dtype=torch.float64)
    lens = logit_lens(backend)
    last_layer = backend.language_model.layers[-1]
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


def margin_curves(c: Collected) -> dict[str, Any]:
    assert c.margin_sums is not None and c.margin_counts is not None
    by_bin = torch.where(c.margin_counts > 0, c.margin_sums / c.margin_counts.clamp_min(1), math.nan)
    mean = c.margin_sums.sum(1) / c.margin_counts.sum(1).clamp_min(1)
    mean = torch.where(c.margin_counts.sum(1) > 0, mean, math.nan)
    return {
        "by_bin": [[json_number(v) for v in row.tolist()] for row in by_bin],
        "mean": [json_number(v) for v in mean.tolist()],
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
        intra[cap] = [json_number(mean_pairwise_cosine(pooled[idx, layer])) for layer in range(L)]
    return {
        "adjacent_cosine": [json_number(v) for v in adjacent],
        "vision_text_cosine": [json_number(v) for v in vision_text],
        "intra_group_similarity": intra,
        "dispersion": {
            "hidden": [json_number(1 - mean_pairwise_cosine(text_pooled[:, layer])) for layer in range(L)],
            "attention": [json_number(1 - mean_pairwise_cosine(profiles[:, layer])) for layer in range(L)],
        },
        "margin": {
            "driving": margin_curves(driving),
            "general": margin_curves(general) if general is not None else None,
        },
    }
