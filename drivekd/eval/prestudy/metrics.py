"""The pre-study's metrics: pure functions over tensors, no model.

Apart from the model side so that each one can be checked against a slow explicit loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from drivekd.errors import DataError

BINS = 10
IGNORE_INDEX = -100


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


def json_number(x: float) -> float | None:
    """A curve value for prestudy.json: rounded to 6 places, None where undefined (JSON has no NaN)."""
    return None if x is None or not math.isfinite(x) else round(float(x), 6)
