"""From several losses to one gradient: Gram matrix → coefficients → `p.grad`.

`combine.py` holds the weightings, pure functions of the task gradients' Gram matrix (like torchjd's
Gramian weightings); this aggregator applies one to a model. Two ways to the Gram matrix:

- `gram="modules"` (`gramian.py`): parameter taps and one k-batched backward give G without keeping
  any task gradient; the coefficients w then weight one ordinary backward of `sum_i w_i L_i`, so under
  DDP its own bucketed reduction averages the ranks' combinations.
- `gram="buffer"`: each task's gradient written into one preallocated `(k, P)` buffer (optionally
  bf16), the Gram matrix in fp32 block by block, the combination written parameter by parameter into
  the gradients and reduced across processes here. Projecting once per step (`project_per="step"`:
  G of gradients summed over micro-batches and averaged over ranks, cross terms included) needs it.
  With a sharded model (FSDP) each backward leaves every rank its shard of the rank-averaged task
  gradient: the buffer holds those shards (k x P/N), G is the sum over the ranks of the partial k x k
  products (k^2 numbers of traffic), every rank takes the same coefficients from it and combines its
  own shards. This is the projection of the global batch's gradients, as one process would make it.

Around either: amortisation (coefficients recomputed every N optimiser steps, `sum_i w_i L_i` in
between), the AGP order drawn from (seed, step), the logged statistics. It is given the optimiser
step; it knows nothing of signals, teachers or capabilities.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator

from drivekd.distill.combine import combination_coefficients, gradient_stats
from drivekd.distill.gramian import ParameterGramian
from drivekd.train.fsdp import as_gradient_of, is_sharded, local, sum_over_ranks

# Called with the loss names and the fp64 Gram matrix whenever coefficients are computed (each
# loss's gradient norm is the square root of its diagonal entry).
GramObserver = Callable[[list[str], torch.Tensor], None]


GRAM_CHUNK = 1 << 22  # columns per block: the fp32 copy of a bf16 buffer is k x 4M values at a time


def gram_matrix(stacked: torch.Tensor) -> torch.Tensor:
    """G = A A^T of the (k, P) task-gradient buffer in fp32, block by block over P (a bf16 buffer is
    never copied whole to fp32)."""
    k, total = stacked.shape
    gram = torch.zeros(k, k, dtype=torch.float32, device=stacked.device)
    for start in range(0, total, GRAM_CHUNK):
        block = stacked[:, start : start + GRAM_CHUNK].float()
        gram += block @ block.T
    return gram


class GradientAggregator:
    def __init__(
        self,
        params: Callable[[], list[torch.nn.Parameter]],
        strategy: str,
        *,
        anchor: str,
        seed: int = 0,
        amortize_every: int | None = None,
        project_per: str = "micro_batch",
        buffer_dtype: torch.dtype | None = None,
        observe_gram: GramObserver | None = None,
        gram: str = "buffer",
        modules: Callable[[], list[torch.nn.Module]] | None = None,
    ) -> None:
        self.params = params
        self.strategy = strategy
        self.buffer_dtype = buffer_dtype  # None: the parameters' dtype
        self.anchor = anchor
        self.seed = seed
        self.amortize_every = amortize_every
        self.project_per = project_per
        self.observe_gram = observe_gram
        self.coefficients: torch.Tensor | None = None  # the last computed, reused while amortised
        self._pending: tuple[list[str], torch.Tensor] | None = None  # task gradients summed over a step
        if gram not in ("buffer", "modules"):
            raise ValueError(f"gram must be buffer or modules, not {gram!r}")
        if gram == "modules" and project_per == "step":
            raise ValueError("gram='modules' cannot project per step: its Gram matrix lacks cross-micro-batch terms")
        # the taps go in at construction: the forward that precedes `backward` must already make them
        self.gramian: ParameterGramian | None = None
        if gram == "modules" and strategy != "sum":
            if modules is None:
                raise ValueError("gram='modules' needs the modules that own the parameters")
            self.gramian = ParameterGramian(modules())

    @property
    def reduces_through_ddp(self) -> bool:
        """`sum` and the `modules` Gram path end in one ordinary backward, so DDP's own gradient reduction
        applies; the buffer path takes per-loss gradients on the plain model and reduces here."""
        return self.strategy == "sum" or self.gramian is not None

    # ---- per micro-batch ------------------------------------------------------------------------
    def backward(self, losses: dict[str, torch.Tensor], accelerator: Accelerator, step: int) -> dict[str, float]:
        if self.strategy == "sum" or len(losses) == 1:
            self._forget_taps()
            accelerator.backward(sum(losses.values()))
            return {}
        names = list(losses)
        every = self.amortize_every
        if every and self.coefficients is not None and step % every != 0:
            self._forget_taps()
            accelerator.backward(sum(float(w) * losses[n] for w, n in zip(self.coefficients, names, strict=True)))
            if accelerator.num_processes > 1 and self.gramian is None and not self._sharded():
                for p in self.params():
                    if p.grad is not None:
                        p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))
            return {}
        if self.gramian is not None:
            w, stats = self._coefficients(names, self.gramian.gram(list(losses.values())), step)
            accelerator.backward(sum(float(x) * losses[n] for x, n in zip(w, names, strict=True)))
            return stats
        stacked = self._task_gradients(losses)
        if self.project_per == "step":
            if self._pending is None:
                self._pending = (names, stacked)
            else:
                self._pending[1].add_(stacked)
            return {}
        return self._combine(names, stacked, accelerator, step, reduced=self._sharded())

    def _sharded(self) -> bool:
        """A sharded model's backward leaves rank-averaged shards (FSDP): nothing left to reduce here."""
        return any(is_sharded(p) for p in self.params())

    def _forget_taps(self) -> None:
        if self.gramian is not None:
            self.gramian.reset()

    def _task_gradients(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """One `(k, P)` buffer, each task's gradient written into its row: one gradient-sized copy per
        task and no other. When the buffer has the parameters' dtype, each backward accumulates
        straight into the row (the parameters' `.grad` point into it meanwhile), so not even one
        whole gradient exists beside it; a bf16 buffer for fp32 weights copies each gradient in."""
        params = self.params()
        total = sum(local(p).numel() for p in params)
        dtype = self.buffer_dtype or params[0].dtype
        stacked = torch.empty((len(losses), total), dtype=dtype, device=local(params[0]).device)
        if any(is_sharded(p) for p in params):
            return self._sharded_task_gradients(losses, params, stacked)
        in_place = all(p.dtype == dtype for p in params)
        earlier = [p.grad for p in params]  # accumulated over earlier micro-batches: kept aside
        try:
            for i, loss in enumerate(losses.values()):
                retain = i < len(losses) - 1
                if in_place:
                    stacked[i].zero_()
                    pieces = self._rows(stacked[i], params)
                    for p, piece in zip(params, pieces, strict=True):
                        p.grad = piece
                    torch.autograd.backward(loss, retain_graph=retain, inputs=params)
                    for p, piece in zip(params, pieces, strict=True):
                        if p.grad is not piece:  # autograd replaced it instead of adding in place
                            piece.copy_(p.grad)
                    continue
                grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
                for g, piece in zip(grads, self._rows(stacked[i], params), strict=True):
                    piece.zero_() if g is None else piece.copy_(g)
                del grads
        finally:
            for p, g in zip(params, earlier, strict=True):
                p.grad = g
        return stacked

    def _sharded_task_gradients(
        self, losses: dict[str, torch.Tensor], params: list[torch.nn.Parameter], stacked: torch.Tensor
    ) -> torch.Tensor:
        """Under FSDP: each task's backward (FSDP reduce-scatters it) leaves this rank's shard of the
        rank-averaged gradient, copied into the row. Whole parameters beside the sharded model (projection
        heads) are averaged here, so every column of the buffer is the global batch's."""
        earlier = [p.grad for p in params]
        # FSDP gathers a unit's weights for the backward when a gradient reaches the unit's output; an
        # attention-map loss enters its layer through the map captured inside it. Adding 0 x every loss
        # sends a (zero) gradient along every output all the losses reach, so each pass gathers what
        # it needs, in order; it changes no gradient.
        touch_all = 0.0 * sum(losses.values())
        try:
            for i, loss in enumerate(losses.values()):
                for p in params:
                    p.grad = None
                # no `inputs=`: FSDP's hooks write the reduced shards onto the sharded parameters, which
                # the graph only reaches through their gathered copies
                torch.autograd.backward(loss + touch_all, retain_graph=i < len(losses) - 1)
                for p, piece in zip(params, self._rows(stacked[i], params), strict=True):
                    piece.zero_() if p.grad is None else piece.copy_(local(p.grad))
        finally:
            for p, g in zip(params, earlier, strict=True):
                p.grad = g
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world > 1:
            for p, piece in zip(params, self._columns(stacked, params), strict=True):
                if not is_sharded(p):
                    piece.copy_(sum_over_ranks(piece.contiguous()) / world)
        return stacked

    @staticmethod
    def _rows(row: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """The pieces of one buffer row shaped like each parameter (this rank's part of a sharded one;
        views, no copy)."""
        pieces, offset = [], 0
        for p in params:
            part = local(p)
            pieces.append(row[offset : offset + part.numel()].view_as(part))
            offset += part.numel()
        return pieces

    @staticmethod
    def _columns(stacked: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """Each parameter's (k, n) block of columns of the buffer (views)."""
        blocks, offset = [], 0
        for p in params:
            n = local(p).numel()
            blocks.append(stacked[:, offset : offset + n])
            offset += n
        return blocks

    def _gram(self, stacked: torch.Tensor) -> torch.Tensor:
        """G of the task gradients in the buffer; of a sharded model's, the partial products of this
        rank's shards summed over the ranks, plus the whole parameters' counted once."""
        params = self.params()
        if not any(is_sharded(p) for p in params):
            return gram_matrix(stacked).double()
        k = stacked.shape[0]
        shards = torch.zeros(k, k, dtype=torch.float64, device=stacked.device)
        whole = torch.zeros(k, k, dtype=torch.float64, device=stacked.device)
        for p, block in zip(params, self._columns(stacked, params), strict=True):
            for start in range(0, block.shape[1], GRAM_CHUNK):
                piece = block[:, start : start + GRAM_CHUNK].float()
                (shards if is_sharded(p) else whole).add_((piece @ piece.T).double())
        return sum_over_ranks(shards) + whole

    # ---- once per optimiser step ----------------------------------------------------------------
    def before_step(self, accelerator: Accelerator, step: int) -> dict[str, float]:
        """`project_per: step`: combine the task gradients summed over the step's micro-batches (and
        averaged across processes, so every rank projects the same global gradients)."""
        if self._pending is None:
            return {}
        names, stacked = self._pending
        self._pending = None
        if accelerator.num_processes > 1 and not self._sharded():
            stacked = accelerator.reduce(stacked, reduction="mean")
        return self._combine(names, stacked, accelerator, step, reduced=True)

    def _combine(
        self, names: list[str], stacked: torch.Tensor, accelerator: Accelerator, step: int, *, reduced: bool = False
    ) -> dict[str, float]:
        w, stats = self._coefficients(names, self._gram(stacked), step)
        # the combination parameter by parameter, in fp32 and into its gradient: no P-sized vector
        # beside the buffer
        w32 = w.to(device=stacked.device, dtype=torch.float32)
        params = self.params()
        for p, block in zip(params, self._columns(stacked, params), strict=True):
            piece = (w32 @ block.float()).view_as(local(p)).to(p.dtype)
            if accelerator.num_processes > 1 and not reduced:
                piece = accelerator.reduce(piece, reduction="mean")
            piece = as_gradient_of(p, piece)
            p.grad = piece if p.grad is None else p.grad.add_(piece)
        return stats

    def _coefficients(self, names: list[str], gram: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The strategy's coefficients for this Gram matrix (kept for amortised steps) and the logged stats."""
        if self.observe_gram is not None:
            self.observe_gram(names, gram)
        # AGP's shuffled order is drawn from (seed, step): reproducible across resumes and ranks
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        w = combination_coefficients(gram, names, self.strategy, anchor=self.anchor, generator=generator)
        # coefficients that left out a signal absent from this batch (zero gradient, weight 0) would
        # switch it off for the amortised steps after: kept only when every loss had a gradient
        self.coefficients = w if bool((gram.diagonal() > 0).all()) else None
        stats = gradient_stats(gram, names)
        stats.update({f"coef/{n}": float(x) for n, x in zip(names, w, strict=True)})
        return w, stats

    # ---- checkpointed state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        return {
            "coefficients": self.coefficients,
            "pending": None if self._pending is None else {"names": self._pending[0], "grads": self._pending[1]},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.coefficients = state["coefficients"]  # type: ignore[assignment]
        pending = state["pending"]
        self._pending = None if pending is None else (list(pending["names"]), pending["grads"])  # type: ignore[index]
