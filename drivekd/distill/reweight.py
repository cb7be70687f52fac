"""Online loss reweighting (docs/method.md §4, the reference code's GradNorm-like rule).

Weights `w_i = softplus(a_i)`. After each optimiser step, with `n_i` the gradient norm of loss i
(unweighted) averaged over the step's micro-batches, `G_i = w_i n_i` is pulled toward
`T_i = p_i * sum(G) * (r_i / mean r)^alpha` (`p_i` the static weight share, `r_i = L_i / L_i(0)`) by
AdamW on `a` minimising `sum |G_i - T_i|`; then the weights are rescaled to the static sum and the CE
weight is kept at or above its floor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class LossReweighter:
    def __init__(
        self,
        static: dict[str, float],
        *,
        lr: float = 3e-4,
        alpha: float = 0.0,
        anchor: str = "ce",
        floor: float = 0.6,
        clamp: tuple[float, float] = (1e-3, 1e6),
    ) -> None:
        self.names = list(static)
        self.static = torch.tensor([static[n] for n in self.names], dtype=torch.float64)
        self.a = torch.nn.Parameter(
            torch.tensor([_inverse_softplus(max(v, 1e-6)) for v in self.static.tolist()], dtype=torch.float64)
        )
        self.optimizer = torch.optim.AdamW([self.a], lr=lr, weight_decay=0.0)
        self.alpha, self.anchor, self.floor, self.clamp = alpha, anchor, floor, clamp
        self.initial: torch.Tensor | None = None
        self._norms = torch.zeros(len(self.names), dtype=torch.float64)
        self._losses = torch.zeros(len(self.names), dtype=torch.float64)
        self._count = 0

    def state_dict(self) -> dict[str, object]:
        return {
            "a": self.a.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "initial": self.initial,
            "norms": self._norms.clone(),
            "losses": self._losses.clone(),
            "count": self._count,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        with torch.no_grad():
            self.a.copy_(state["a"])  # type: ignore[arg-type]
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        self.initial = state["initial"]  # type: ignore[assignment]
        self._norms = state["norms"].clone()  # type: ignore[union-attr]
        self._losses = state["losses"].clone()  # type: ignore[union-attr]
        self._count = int(state["count"])  # type: ignore[arg-type]

    def weights(self) -> dict[str, float]:
        w = torch.nn.functional.softplus(self.a.detach()).clamp(*self.clamp)
        return dict(zip(self.names, w.tolist(), strict=True))

    def observe(self, grad_norms: dict[str, float], losses: dict[str, float]) -> None:
        """Gradient norms and values of the *unweighted* losses of one micro-batch."""
        self._norms += torch.tensor([grad_norms[n] for n in self.names], dtype=torch.float64)
        self._losses += torch.tensor([losses[n] for n in self.names], dtype=torch.float64)
        self._count += 1

    def step(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """`reduce` averages the statistics over processes so every rank keeps the same weights."""
        if self._count == 0:
            return {}
        norms, values = self._norms / self._count, self._losses / self._count
        if reduce is not None:
            norms, values = reduce(norms), reduce(values)
        self._norms.zero_(), self._losses.zero_()
        self._count = 0
        if self.initial is None:
            self.initial = values.clamp_min(1e-12)
        w = torch.nn.functional.softplus(self.a)
        g = w * norms
        ratio = values / self.initial
        share = self.static / self.static.sum()
        target = (share * g.sum() * (ratio / ratio.mean()) ** self.alpha).detach()
        loss = (g - target).abs().sum()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            w = torch.nn.functional.softplus(self.a).clamp(*self.clamp)
            w = w * self.static.sum() / w.sum()
            if self.anchor in self.names:
                i = self.names.index(self.anchor)
                w[i] = w[i].clamp_min(self.floor)
            self.a.copy_(torch.tensor([_inverse_softplus(float(x)) for x in w], dtype=torch.float64))
        return {f"weight/{n}": float(x) for n, x in zip(self.names, w, strict=True)}
