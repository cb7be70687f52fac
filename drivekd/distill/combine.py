"""Combining task gradients: plain sum, PCGrad and Asymmetric Gradient Projection (docs/method.md §5).

Every strategy returns a linear combination of the task gradients, so it only needs their Gram
matrix: vectors are kept as coefficient rows over the task gradients, a dot product is `a @ G @ b`,
and the parameters are touched once, in the final combination. Like torchjd's aggregators, the
maths sees only a `k x k` matrix, however large the model.

Names: `anchor` is the weighted cross-entropy gradient `g_s`; every other name is a weighted
distillation gradient `g_c` (one per capability or teacher). `order` fixes the shuffled order of the
distillation names (and of all names for PCGrad), for reproducibility.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

STRATEGIES: tuple[str, ...] = ("sum", "pcgrad", "agp", "agp-stage1", "agp-stage2", "agp-normalized")
_EPS = 1e-20


def _dot(a: torch.Tensor, b: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    return a @ gram @ b


def _project(u: torch.Tensor, v: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """proj(u, v) = u - (<u,v>/|v|^2) v when <u,v> < 0, else u; in coefficient space."""
    uv, vv = _dot(u, v, gram), _dot(v, v, gram)
    if uv < 0 and vv > _EPS:
        return u - (uv / vv) * v
    return u


def _ordered(names: Sequence[str], order: Sequence[str] | None, generator: torch.Generator | None) -> list[str]:
    if order is not None:
        missing = set(names) - set(order)
        if missing:
            raise ValueError(f"order lacks {sorted(missing)}")
        return [n for n in order if n in names]
    if generator is not None:
        return [names[i] for i in torch.randperm(len(names), generator=generator).tolist()]
    return list(names)


def _stage2(us: dict[str, torch.Tensor], sequence: list[str], gram: torch.Tensor) -> torch.Tensor:
    """Each v_c starts at u_c and is projected against every other *unprojected* u_c' in order."""
    total = torch.zeros_like(next(iter(us.values())))
    for c in sequence:
        v = us[c]
        for other in sequence:
            if other != c:
                v = _project(v, us[other], gram)
        total = total + v
    return total


def combination_coefficients(
    gram: torch.Tensor,
    names: Sequence[str],
    strategy: str,
    *,
    anchor: str = "ce",
    order: Sequence[str] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Coefficients `w` (one per name) such that the combined gradient is `sum_i w_i g_i`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    k = len(names)
    gram = gram.to(torch.float64)
    basis = torch.eye(k, dtype=torch.float64)
    index = {n: i for i, n in enumerate(names)}
    if strategy == "sum":
        return torch.ones(k, dtype=torch.float64)
    if strategy == "pcgrad":
        sequence = _ordered(list(names), order, generator)
        total = torch.zeros(k, dtype=torch.float64)
        for name in sequence:
            g = basis[index[name]]
            for other in sequence:
                if other != name:
                    g = _project(g, basis[index[other]], gram)
            total = total + g
        return total
    if anchor not in index:
        raise ValueError(f"anchor {anchor!r} is not among the gradients {list(names)}")
    g_s = basis[index[anchor]]
    # a distillation loss whose gradient is exactly zero (its signal weighs nothing on this batch's
    # capabilities, e.g. `mixing: identity` without that capability) is no task: it would add the
    # anchor once more (u_c = g_s + 0)
    distill = [n for n in names if n != anchor and gram[index[n], index[n]] > 0]
    tasks = _ordered(distill, None if order is None else [n for n in order if n != anchor], generator)
    if not tasks:
        return g_s
    n = len(tasks)
    us = {}
    for c in tasks:
        g_c = basis[index[c]]
        if strategy == "agp-stage2":
            us[c] = g_s + g_c
        elif strategy == "agp-normalized":
            us[c] = g_s / n + _project(g_c, g_s, gram)
        else:  # agp, agp-stage1: the anchor is never changed, only the follower gives way
            us[c] = g_s + _project(g_c, g_s, gram)
    if strategy == "agp-stage1":
        return sum(us.values())  # type: ignore[return-value]
    return _stage2(us, tasks, gram)


def combine_gradients(
    grads: Mapping[str, torch.Tensor],
    strategy: str,
    *,
    anchor: str = "ce",
    order: Sequence[str] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Combine 1-D task gradients of equal length; see the module docstring for the strategies."""
    names = list(grads)
    stacked = torch.stack([grads[n] for n in names])
    work = stacked if stacked.dtype in (torch.float32, torch.float64) else stacked.float()
    gram = (work @ work.T).double()  # k x k: the only pass over the parameters before combining
    w = combination_coefficients(gram, names, strategy, anchor=anchor, order=order, generator=generator)
    return w.to(stacked.dtype) @ stacked


def gradient_stats(gram: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """Pairwise cosines between task gradients and the conflict rate (share of negative dot products)."""
    gram = gram.to(torch.float64)
    norms = gram.diagonal().clamp_min(_EPS).sqrt()
    cos = gram / (norms[:, None] * norms[None, :])
    out: dict[str, float] = {}
    pairs = 0
    conflicts = 0
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            out[f"cos/{names[i]}~{names[j]}"] = float(cos[i, j])
            if gram[i, i] > 0 and gram[j, j] > 0:  # a zero gradient neither conflicts nor agrees
                pairs += 1
                conflicts += int(gram[i, j] < 0)
    out["conflict_rate"] = conflicts / pairs if pairs else 0.0
    return out
