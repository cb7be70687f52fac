"""Online loss reweighting (docs/method.md §4, the reference code's GradNorm-like rule): experimental,
`drivekd experimental distill-reweight`.

Weights `w_i = softplus(a_i)`. After each optimiser step, with `n_i` the gradient norm of loss i
(unweighted) averaged over the step's micro-batches, `G_i = w_i n_i` is pulled toward
`T_i = p_i * sum(G) * (r_i / mean r)^alpha` (`p_i` the static weight share, `r_i = L_i / L_i(0)`) by
AdamW on `a` minimising `sum |G_i - T_i|`; then the weights are rescaled to the static sum and the CE
weight is kept at or above its floor.

`ReweightDistiller` is the product `Distiller` with its loss weights taken from a `LossReweighter`,
fed by the Distiller's hooks: the Gram matrix's diagonal (gradient norms), the losses of each
backward, one reweighting step per optimiser step; the reweighter's state is checkpointed with the
Distiller's, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator

from drivekd.data.sample import Sample
from drivekd.distill.engine import Distiller
from drivekd.distill.run import run_distill
from drivekd.experimental.config import ReweightDistillConfig
from drivekd.models.backend import VLMBackend


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


class ReweightDistiller(Distiller):
    config: ReweightDistillConfig

    def __init__(self, config: ReweightDistillConfig, student: VLMBackend, train: Sequence[Sample]) -> None:
        super().__init__(config, student, train)
        self.reweighter: LossReweighter | None = None  # made once the static weights are set
        self._values: dict[str, float] = {}  # the last micro-batch's unweighted losses

    def set_weights(self, weights: dict[str, float]) -> None:
        super().set_weights(weights)
        reweight = self.config.reweight
        self.reweighter = LossReweighter(
            super().loss_weights(), lr=reweight.lr, alpha=reweight.alpha, floor=reweight.ce_floor
        )

    def loss_weights(self) -> dict[str, float]:
        return self.reweighter.weights() if self.reweighter is not None else super().loss_weights()

    def observe_gram(self, names: list[str], gram: torch.Tensor) -> None:
        if self.reweighter is None:
            return
        w_now = self.reweighter.weights()
        norms = {n: float(gram[i, i].sqrt()) / max(w_now[n], 1e-12) for i, n in enumerate(names)}
        self.reweighter.observe(norms, self._values)

    def backward(self, losses: dict[str, torch.Tensor], accelerator: Accelerator, step: int) -> dict[str, float]:
        w_now = self.loss_weights()
        self._values = {n: float(v.detach()) / max(w_now[n], 1e-12) for n, v in losses.items()}
        return super().backward(losses, accelerator, step)

    def before_step(self, accelerator: Accelerator, step: int) -> dict[str, float]:
        """Combine (the base's), then one reweighting step on the statistics averaged over processes."""
        stats = super().before_step(accelerator, step)
        assert self.reweighter is not None, "set_weights first"
        reduce = (
            (lambda t: accelerator.reduce(t.to(accelerator.device), reduction="mean").cpu())
            if accelerator.num_processes > 1
            else None
        )
        stats.update(self.reweighter.step(reduce))
        return stats

    def state_dict(self) -> dict[str, object]:
        assert self.reweighter is not None, "set_weights first"
        return {**super().state_dict(), "reweighter": self.reweighter.state_dict(), "values": dict(self._values)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        super().load_state_dict(state)
        assert self.reweighter is not None, "set_weights first"
        self.reweighter.load_state_dict(state["reweighter"])  # type: ignore[arg-type]
        self._values = dict(state["values"])  # type: ignore[call-overload]


def run_distill_reweight(config: ReweightDistillConfig, *, resume: bool = False) -> Path:
    return run_distill(config, resume=resume, distiller_class=ReweightDistiller)
