"""The Gram matrix of k losses' gradients without the k gradients: parameter taps and one k-batched backward.

While a module runs its forward, each of its own trainable parameters is replaced by a *tap*: an
identity autograd node between the parameter and the ops that use it. `ParameterGramian.gram(losses)`
then backpropagates the k losses at once (`torch.vmap` over the k unit cotangents, the principle of
torchjd's autogram engine) towards one scalar *anchor* that every tap also takes as input, so
the engine reaches every tap without accumulating into (or returning) any parameter's gradient.
A tap's backward sees its parameter's k gradients for that use, `(k, *p.shape)`; the gradients of
every use of a parameter are summed (a tied embedding is used twice, a module called twice uses its
weights twice) and `J_p J_p^T` is added to the fp64 Gram matrix, after which they are dropped. So at
most one parameter's k gradients exist at a time, plus those of a parameter whose uses have not all
been reached yet (a tied input/output embedding: the head's, until the embedding's backward).

Outside `gram`, a tap passes its gradient straight to the parameter: an ordinary backward (under DDP,
with DDP's bucketed reduction) is unchanged. Taps exist only while a forward with gradients runs,
and only on modules this object hooked (the student and the distiller's projection heads): a
parameter read directly by a module other than its owner, outside the owner's forward, would be
missed, which the tests rule out for the supported models by comparing with explicit gradients.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

GRAM_CHUNK = 1 << 18  # columns per fp64 block: k x 256K x 8 bytes (8 MiB for k = 4) at a time


class _Site:
    """What a tap's backward needs: the owner and which parameter it stands for."""

    __slots__ = ("key", "owner")

    def __init__(self, owner: ParameterGramian, key: int) -> None:
        self.owner, self.key = owner, key


class _Tap(torch.autograd.Function):
    """Identity on the parameter; in `gram`'s backward it hands the (batched) gradient to the owner."""

    generate_vmap_rule = True

    @staticmethod
    def forward(param: torch.Tensor, anchor: torch.Tensor, site: _Site) -> torch.Tensor:
        return param.detach()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.site = inputs[2]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        site: _Site = ctx.site
        if site.owner.collecting:
            _Take.apply(grad, site)
            return None, grad.new_zeros(()), None
        return grad, None, None


class _Take(torch.autograd.Function):
    """Called inside the vmapped backward: its `vmap` rule sees the k gradients as one tensor."""

    @staticmethod
    def forward(grad: torch.Tensor, site: _Site) -> torch.Tensor:  # unbatched: a single loss
        site.owner._take(site.key, grad.unsqueeze(0))
        return grad.new_zeros(())

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple, grad: torch.Tensor, site: _Site) -> tuple[torch.Tensor, None]:
        dim = in_dims[0]
        batched = grad.movedim(dim, 0) if dim is not None else grad.unsqueeze(0).expand(info.batch_size, *grad.shape)
        site.owner._take(site.key, batched)
        return grad.new_zeros(()), None


class ParameterGramian:
    """Hooks `roots`' modules that own trainable parameters; `gram(losses)` is the `(k, k)` fp64 Gram
    matrix of the losses' gradients with respect to every tapped parameter."""

    def __init__(self, roots: Iterable[torch.nn.Module]) -> None:
        self.collecting = False
        self._anchors: dict[torch.device, torch.Tensor] = {}
        self._uses: dict[int, int] = defaultdict(int)  # taps made since the last reset, per parameter
        self._arrived: dict[int, int] = defaultdict(int)
        self._pending: dict[int, torch.Tensor] = {}  # summed (k, n) gradients of partly reached parameters
        self._gram: torch.Tensor | None = None
        self._swapped: dict[int, list[dict[str, torch.nn.Parameter]]] = defaultdict(list)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # the hooks hold this object weakly and go with it: a model outlives the distiller that hooked it
        owner = weakref.ref(self)

        def pre(module: torch.nn.Module, args: object) -> None:
            this = owner()
            if this is not None:
                this._pre(module)

        def post(module: torch.nn.Module, args: object, output: object) -> None:
            this = owner()
            if this is not None:
                this._post(module)

        seen: set[int] = set()
        for root in roots:
            for module in root.modules():
                if id(module) in seen or not any(p is not None for p in module._parameters.values()):
                    continue
                seen.add(id(module))
                self._handles.append(module.register_forward_pre_hook(pre))
                self._handles.append(module.register_forward_hook(post, always_call=True))
        self._finalizer = weakref.finalize(self, ParameterGramian._unhook, self._handles)

    @staticmethod
    def _unhook(handles: list[torch.utils.hooks.RemovableHandle]) -> None:
        for handle in handles:
            handle.remove()
        handles.clear()

    def remove(self) -> None:
        """Take the hooks off now (they also go when this object is collected)."""
        self._finalizer()

    # ---- forward: taps -------------------------------------------------------------------------
    def _anchor(self, device: torch.device) -> torch.Tensor:
        if device not in self._anchors:
            self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return self._anchors[device]

    def _pre(self, module: torch.nn.Module) -> None:
        saved: dict[str, torch.nn.Parameter] = {}
        if torch.is_grad_enabled() and not self.collecting:
            for name, p in module._parameters.items():
                if p is not None and p.requires_grad and isinstance(p, torch.nn.Parameter):
                    saved[name] = p
                    self._uses[id(p)] += 1
                    module._parameters[name] = _Tap.apply(p, self._anchor(p.device), _Site(self, id(p)))  # type: ignore[assignment]
        self._swapped[id(module)].append(saved)

    def _post(self, module: torch.nn.Module) -> None:
        stack = self._swapped.get(id(module))
        if stack:
            module._parameters.update(stack.pop())

    def reset(self) -> None:
        """Forget the taps counted so far (after each backward)."""
        self._uses.clear()
        self._arrived.clear()
        self._pending.clear()

    # ---- backward: the Gram matrix -------------------------------------------------------------
    def _take(self, key: int, grads: torch.Tensor) -> None:
        flat = grads.reshape(grads.shape[0], -1)
        if key in self._pending:
            flat = self._pending.pop(key) + flat
        self._arrived[key] += 1
        if self._arrived[key] < self._uses.get(key, 0):
            self._pending[key] = flat
            return
        self._add(flat)

    def _add(self, flat: torch.Tensor) -> None:
        # fp64 products of column blocks: an fp32 product over millions of columns is off by ~1e-4
        assert self._gram is not None
        for start in range(0, flat.shape[1], GRAM_CHUNK):
            block = flat[:, start : start + GRAM_CHUNK].double()
            self._gram += (block @ block.T).to(self._gram.device)

    def gram(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """G[i, j] = <grad L_i, grad L_j> over the tapped parameters, fp64 `(k, k)`; the graph is kept
        for the backward that follows."""
        k = len(losses)
        vector = torch.stack([loss.float() for loss in losses])
        anchors = list(self._anchors.values())
        self._gram = torch.zeros(k, k, dtype=torch.float64, device=vector.device)
        if not anchors:  # nothing was tapped: no trainable parameter was used
            return self._gram

        def differentiate(cotangent: torch.Tensor) -> torch.Tensor:
            found = torch.autograd.grad(vector, anchors, grad_outputs=cotangent, retain_graph=True, allow_unused=True)
            return sum((g.to(cotangent.device) for g in found if g is not None), cotangent.sum() * 0)

        self.collecting = True
        try:
            torch.vmap(differentiate)(torch.eye(k, dtype=vector.dtype, device=vector.device))
            for flat in self._pending.values():  # a use never reached (its output did not matter)
                self._add(flat)
            return self._gram.cpu()
        finally:
            self.collecting = False
            self._gram = None
            self.reset()
