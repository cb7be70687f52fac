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

A large `nn.Linear` or `nn.Embedding` (a vocabulary's embedding or LM head: k of its gradients are
k x 0.5 GiB at InternVL3-1B's shape, k x 2.3 GiB at 8B's) is tapped at its *output* instead: its
backward sees the k output cotangents and adds the weight's Gram block from them and the saved input,
never forming the k weight gradients (a linear layer: `G^T X` a block of output rows at a time, or,
when the rows are few, `<G_i G_j^T, X X^T>`; an embedding: the cotangents summed per token id; a
weight tied between the two: both, and their cross terms on the rows the embedding touches).

A loss whose graph is a small part of the model (`SHALLOW_SHARE`; found by walking each loss's graph
to the taps it reaches) runs first in a pass of its own, which keeps its gradients (their cotangents,
for output taps); the other losses' pass then adds each parameter's whole block, cross terms
included. So the batched pass carries no lane that is zero through most of the model.

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

from drivekd.models.checkpointing import recomputing

GRAM_CHUNK = 1 << 18  # columns per fp64 block: k x 256K x 8 bytes (8 MiB for k = 4) at a time
# a Linear or Embedding whose weight has at least this many values is tapped at its output (below it,
# k weight gradients cost little and the parameter taps stay on autograd's own backward)
OUTPUT_TAP_FROM = 1 << 24
# a loss whose graph reaches at most this share of what all the losses' graphs reach (parameters, and
# output taps' cotangents; an attention-map loss of the first layer reaches that layer, the projector
# and the embeddings' cotangents) runs in a pass of its own
# first and keeps its gradients for the cross terms, so the k-batched pass through the whole model
# does not carry its zeros above its graph
SHALLOW_SHARE = 1 / 8


class _Site:
    """What a tap's backward needs: the owner and which parameter it stands for."""

    __slots__ = ("key", "owner")

    def __init__(self, owner: ParameterGramian, key: int) -> None:
        self.owner, self.key = owner, key

    def take(self, grads: torch.Tensor, saved: torch.Tensor | None) -> None:
        self.owner._take(self.key, grads)


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
    """Called inside the vmapped backward: its `vmap` rule sees the k gradients as one tensor and hands
    them to the site (a parameter's, or an output tap's)."""

    @staticmethod
    def forward(
        grad: torch.Tensor, site: _Site | _OutputSite, saved: torch.Tensor | None = None
    ) -> torch.Tensor:  # unbatched: a single loss
        site.take(grad.unsqueeze(0), saved)
        return grad.new_zeros(())

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        pass

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple, grad: torch.Tensor, site: _Site | _OutputSite, saved: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None]:
        dim = in_dims[0]
        batched = grad.movedim(dim, 0) if dim is not None else grad.unsqueeze(0).expand(info.batch_size, *grad.shape)
        site.take(batched, saved)
        return grad.new_zeros(()), None


class _OutputSite:
    """One call of an output-tapped module: the owner, the weight's key (a tied embedding and head
    share it), the module and how many rows its input has (the input itself is saved by the tap's
    autograd node: kept with the module's own, and recomputed with it under activation checkpointing)."""

    __slots__ = ("key", "module", "owner", "rows")

    def __init__(self, owner: ParameterGramian, key: int, module: torch.nn.Module, rows: int) -> None:
        self.owner, self.key, self.module, self.rows = owner, key, module, rows

    def take(self, grads: torch.Tensor, saved: torch.Tensor | None) -> None:
        assert saved is not None
        self.owner._take_output(self, grads, saved)


class _OutputTap(torch.autograd.Function):
    """Identity on a module's output; in `gram`'s backward it hands the k output cotangents to the
    owner and passes them on to the module."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        output: torch.Tensor, anchor: torch.Tensor, saved: torch.Tensor, site: _OutputSite | None
    ) -> torch.Tensor:
        return output.view_as(output)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[2])
        ctx.site = inputs[3]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        site: _OutputSite | None = ctx.site  # None: a checkpointed layer's recompute, whose graph is dropped
        if site is not None and site.owner.collecting:
            _Take.apply(grad, site, ctx.saved_tensors[0])
            return grad, grad.new_zeros(()), None, None
        return grad, None, None, None


def _output_tappable(module: torch.nn.Module, threshold: int) -> bool:
    """A plain Linear or Embedding with a large trainable weight (an Embedding's backward options
    that change its gradient, sparse or frequency-scaled, keep the parameter taps)."""
    if type(module) is torch.nn.Embedding:
        if module.sparse or module.scale_grad_by_freq or module.max_norm is not None:
            return False
    elif type(module) is not torch.nn.Linear:
        return False
    return module.weight.requires_grad and module.weight.numel() >= threshold


def output_tapped(modules: Iterable[torch.nn.Module], threshold: int | None = None) -> list[torch.nn.Module]:
    """The modules whose weight the Gram pass takes at their output (`OUTPUT_TAP_FROM` values and
    up). A weight's block needs the sum of all its uses' gradients: a weight shared by an Embedding
    and a Linear (a tied embedding and head) is taken at both outputs together; any other sharing
    keeps the parameter taps."""
    modules = list(modules)
    threshold = OUTPUT_TAP_FROM if threshold is None else threshold
    owners: dict[int, list[torch.nn.Module]] = defaultdict(list)
    for module in modules:
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)].append(module)

    def alone_or_tied(module: torch.nn.Module) -> bool:
        for name, p in module._parameters.items():
            sharing = owners[id(p)] if p is not None else [module]
            if len(sharing) == 1:
                continue
            tied = (
                name == "weight"
                and len(sharing) == 2
                and {type(m) for m in sharing} == {torch.nn.Embedding, torch.nn.Linear}
            )
            headless = all(getattr(m, "bias", None) is None for m in sharing)  # `tied_gram` has no bias term
            if not (tied and headless and all(_output_tappable(m, threshold) for m in sharing)):
                return False
        return True

    return [m for m in modules if _output_tappable(m, threshold) and alone_or_tied(m)]


def linear_gram(inputs: torch.Tensor, grads: torch.Tensor, bias: bool) -> torch.Tensor:
    """fp64 `(k, k)` Gram block of a linear layer's weight (and bias) gradients `G_i^T X`, from its
    inputs `X` `(n, in)` and the k output cotangents `G` `(k, n, out)`, without the k gradients."""
    k, n, out = grads.shape
    width = inputs.shape[1]
    gram = torch.zeros(k, k, dtype=torch.float64, device=grads.device)
    if k * n <= width:  # few rows (an LM head at the answer positions): <G_i G_j^T, X X^T>
        x = inputs.double()
        g = grads.reshape(k * n, out).double()
        gram += torch.einsum("iajb,ab->ij", (g @ g.T).view(k, n, k, n), x @ x.T)
    else:  # the weight gradients a block of output rows at a time
        rows = max(1, GRAM_CHUNK // width)
        for start in range(0, out, rows):
            block = torch.matmul(grads[:, :, start : start + rows].transpose(1, 2), inputs).reshape(k, -1).double()
            gram += block @ block.T
    if bias:
        b = grads.sum(1).double()
        gram += b @ b.T
    return gram


def embedding_rows(
    ids: torch.Tensor, grads: torch.Tensor, padding_idx: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """An embedding's k weight gradients on the rows they touch: the distinct looked-up ids `(U,)` and
    the k output cotangents `(k, n, width)` summed per id, fp64 `(k, U, width)` (the padding row gets
    no gradient)."""
    if padding_idx is not None:
        keep = ids != padding_idx
        ids, grads = ids[keep], grads[:, keep]
    unique, inverse = torch.unique(ids, return_inverse=True)
    summed = torch.zeros(grads.shape[0], unique.numel(), grads.shape[2], dtype=torch.float64, device=grads.device)
    summed.index_add_(1, inverse, grads.double())
    return unique, summed


def embedding_gram(ids: torch.Tensor, grads: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    """fp64 `(k, k)` Gram block of an embedding's weight gradients from the looked-up ids `(n,)` and
    the k output cotangents `(k, n, width)`."""
    flat = embedding_rows(ids, grads, padding_idx)[1].flatten(1)
    return flat @ flat.T


def tied_gram(
    ids: torch.Tensor, embedded: torch.Tensor, padding_idx: int | None, inputs: torch.Tensor, logits: torch.Tensor
) -> torch.Tensor:
    """fp64 `(k, k)` Gram block of a weight tied between an embedding (ids `(n,)`, output cotangents
    `(k, n, width)`) and a head without bias (inputs `(m, width)`, output cotangents `(k, m, vocab)`):
    <E_i + H_i, E_j + H_j>, the cross terms over the rows the embedding touches (`H` there is
    `G[:, :, rows]^T X`)."""
    rows, summed = embedding_rows(ids, embedded, padding_idx)
    flat = summed.flatten(1)
    head_rows = torch.einsum("kmr,mw->krw", logits[:, :, rows].double(), inputs.double()).flatten(1)
    cross = flat @ head_rows.T
    return flat @ flat.T + linear_gram(inputs, logits, bias=False) + cross + cross.T


class ParameterGramian:
    """Hooks `roots`' modules that own trainable parameters; `gram(losses)` is the `(k, k)` fp64 Gram
    matrix of the losses' gradients with respect to every tapped parameter."""

    def __init__(self, roots: Iterable[torch.nn.Module], *, output_taps_from: int | None = None) -> None:
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

        def post(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> object:
            this = owner()
            return None if this is None else this._post(module, args, kwargs, output)

        seen: set[int] = set()
        hooked: list[torch.nn.Module] = []
        for root in roots:
            for module in root.modules():
                if id(module) in seen or not any(p is not None for p in module._parameters.values()):
                    continue
                seen.add(id(module))
                hooked.append(module)
                self._handles.append(module.register_forward_pre_hook(pre))
                self._handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
        self._output_tapped = {id(m) for m in output_tapped(hooked, output_taps_from)}
        Use = tuple[torch.nn.Module, torch.Tensor, torch.Tensor]  # the module, its input, the k cotangents
        self._outputs: dict[int, dict[int, Use]] = defaultdict(dict)  # arrived uses
        self._numel: dict[int, int] = {}
        # during `gram`: the lanes (loss indices) of the running pass, whether it is the shallow losses'
        # pass, and what that pass kept for the cross terms
        self._lanes = torch.zeros(0, dtype=torch.long)
        self._shallow = torch.zeros(0, dtype=torch.long)
        self._storing = False
        self._stored: dict[int, torch.Tensor] = {}
        self._stored_outputs: dict[int, dict[int, Use]] = {}
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

    def _at_output(self, module: torch.nn.Module) -> bool:
        """Tapped at its output this call: chosen at construction, and its weight still trains (a
        weight frozen since then falls back to the parameter taps, which skip it)."""
        return id(module) in self._output_tapped and bool(module.weight.requires_grad)

    def _pre(self, module: torch.nn.Module) -> None:
        saved: dict[str, torch.nn.Parameter] = {}
        # a checkpointed layer's recompute refills the saved tensors of the first forward's graph, whose
        # taps hold the gradients; taps made or counted again would wait for gradients that never come
        if self._at_output(module) or recomputing():
            return
        if torch.is_grad_enabled() and not self.collecting:
            for name, p in module._parameters.items():
                if p is not None and p.requires_grad and isinstance(p, torch.nn.Parameter):
                    saved[name] = p
                    self._uses[id(p)] += 1
                    self._numel[id(p)] = p.numel()
                    module._parameters[name] = _Tap.apply(p, self._anchor(p.device), _Site(self, id(p)))  # type: ignore[assignment]
        self._swapped[id(module)].append(saved)

    def _post(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        replay = recomputing()
        if self._at_output(module):
            # a recompute taps as the first forward did (which ran outside `gram`), so that its saved
            # tensors line up with the first forward's, but counts nothing
            if not (torch.is_grad_enabled() and (replay or not self.collecting) and isinstance(output, torch.Tensor)):
                return None
            x = (args[0] if args else kwargs["input"]).detach()
            if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
                # the weight's gradient is taken from the input as autocast casts it for the product
                x = x.to(torch.get_autocast_dtype(x.device.type))
            site = None
            if not replay:
                key = id(module.weight)  # a tied embedding and head: one weight, one key
                self._uses[key] += 1
                site = _OutputSite(
                    self, key, module, x.numel() if not x.is_floating_point() else x.numel() // x.shape[-1]
                )
            return _OutputTap.apply(output, self._anchor(output.device), x, site)
        if replay:
            return None
        stack = self._swapped.get(id(module))
        if stack:
            module._parameters.update(stack.pop())
        return None

    def reset(self) -> None:
        """Forget the taps counted so far (after each backward)."""
        self._uses.clear()
        self._arrived.clear()
        self._pending.clear()
        self._outputs.clear()
        self._stored.clear()
        self._stored_outputs.clear()

    # ---- backward: the Gram matrix -------------------------------------------------------------
    def _take(self, key: int, grads: torch.Tensor) -> None:
        flat = grads.reshape(grads.shape[0], -1)
        if key in self._pending:
            flat = self._pending.pop(key) + flat
        self._arrived[key] += 1
        if self._arrived[key] < self._uses.get(key, 0):
            self._pending[key] = flat
            return
        self._complete(key, flat)

    def _complete(self, key: int, flat: torch.Tensor) -> None:
        """A parameter's summed gradients of this pass's lanes: kept (the shallow pass), or its block
        added, with the shallow pass's rows for it when it kept some."""
        if self._storing:
            self._stored[key] = flat
        elif key in self._stored:
            self._add(torch.cat([self._stored.pop(key), flat]), torch.cat([self._shallow, self._lanes]))
        else:
            self._add(flat, self._lanes)

    def _take_output(self, site: _OutputSite, grads: torch.Tensor, saved: torch.Tensor) -> None:
        self._outputs[site.key][id(site)] = (site.module, saved, grads)
        if len(self._outputs[site.key]) == self._uses.get(site.key, 0):
            self._complete_output(site.key)

    def _complete_output(self, key: int) -> None:
        uses = self._outputs.pop(key)
        if self._storing:
            self._stored_outputs[key] = uses
            return
        lanes = self._lanes
        kept = self._stored_outputs.pop(key, None)
        if kept is not None:  # each use's cotangents: the shallow lanes' (or zeros) above this pass's
            lanes = torch.cat([self._shallow, self._lanes])
            joined = {}
            for site in kept.keys() | uses.keys():
                low = kept.get(site)
                high = uses.get(site)
                module, saved, like = high or low  # type: ignore[misc]
                low_g = low[2] if low else like.new_zeros(len(self._shallow), *like.shape[1:])
                high_g = high[2] if high else like.new_zeros(len(self._lanes), *like.shape[1:])
                joined[site] = (module, saved, torch.cat([low_g, high_g]))
            uses = joined
        self._add_output(key, list(uses.values()), lanes)

    def _add_output(
        self, key: int, uses: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]], lanes: torch.Tensor
    ) -> None:
        """The Gram block of an output-tapped weight over every use of it (concatenated along the rows:
        the weight's gradient is the sum over its uses), a tied embedding's and head's together."""

        def joined(kind: type) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor] | None:
            mine = [(m, x, g) for m, x, g in uses if isinstance(m, kind)]
            if not mine:
                return None
            k = mine[0][2].shape[0]
            x = torch.cat(
                [x.reshape(-1) if not x.is_floating_point() else x.reshape(-1, x.shape[-1]) for _, x, _ in mine]
            )
            g = torch.cat([g.reshape(k, -1, g.shape[-1]) for _, _, g in mine], dim=1)
            return mine[0][0], x, g if g.dtype in (torch.float32, torch.float64) else g.float()

        embedding, linear = joined(torch.nn.Embedding), joined(torch.nn.Linear)
        if embedding is not None and linear is not None:  # tied
            (e, ids, e_grads), (_, x, l_grads) = embedding, linear
            block = tied_gram(ids, e_grads, e.padding_idx, x.to(l_grads.dtype), l_grads)
        elif embedding is not None:
            e, ids, e_grads = embedding
            block = embedding_gram(ids, e_grads, e.padding_idx)
        else:
            assert linear is not None
            module, x, l_grads = linear
            bias = module.bias is not None and module.bias.requires_grad
            block = linear_gram(x.to(l_grads.dtype), l_grads, bias)
        self._place(block, lanes)

    def _add(self, flat: torch.Tensor, lanes: torch.Tensor) -> None:
        # fp64 products of column blocks: an fp32 product over millions of columns is off by ~1e-4
        block = torch.zeros(len(lanes), len(lanes), dtype=torch.float64, device=flat.device)
        for start in range(0, flat.shape[1], GRAM_CHUNK):
            piece = flat[:, start : start + GRAM_CHUNK].double()
            block += piece @ piece.T
        self._place(block, lanes)

    def _place(self, block: torch.Tensor, lanes: torch.Tensor) -> None:
        assert self._gram is not None
        index = lanes.to(self._gram.device)
        self._gram[index[:, None], index[None, :]] += block.to(self._gram.device)

    def _reached(self, loss: torch.Tensor) -> dict[int, int]:
        """What `loss`'s graph reaches, with its size: its tapped parameters (by key), and the outputs of
        the output-tapped calls it reaches (by site; what a shallow pass keeps)."""
        seen: set[Any] = set()
        stack = [loss.grad_fn]
        reached: dict[int, int] = {}  # a parameter's key, or an output tap's site
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            site = getattr(node, "site", None)
            if isinstance(site, _Site):
                reached[site.key] = self._numel.get(site.key, 0)
            elif isinstance(site, _OutputSite):
                module = site.module
                width = module.embedding_dim if isinstance(module, torch.nn.Embedding) else module.out_features
                reached[id(site)] = site.rows * width
            stack.extend(f for f, _ in node.next_functions)
        return reached

    def gram(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """G[i, j] = <grad L_i, grad L_j> over the tapped parameters, fp64 `(k, k)`; the graph is kept
        for the backward that follows."""
        k = len(losses)
        anchors = list(self._anchors.values())
        device = losses[0].device
        self._gram = torch.zeros(k, k, dtype=torch.float64, device=device)
        if not anchors:  # nothing was tapped: no trainable parameter was used
            return self._gram

        def differentiate(vector: torch.Tensor) -> Any:
            # only this pass's losses: the engine runs only the nodes their graphs reach
            def one(cotangent: torch.Tensor) -> torch.Tensor:
                found = torch.autograd.grad(
                    vector, anchors, grad_outputs=cotangent, retain_graph=True, allow_unused=True
                )
                return sum((g.to(cotangent.device) for g in found if g is not None), cotangent.sum() * 0)

            return one

        live = [i for i in range(k) if losses[i].requires_grad]  # a constant loss has a zero gradient
        if not live:
            self._gram = None
            self.reset()
            return torch.zeros(k, k, dtype=torch.float64)
        reached = {i: self._reached(losses[i]) for i in live}
        whole = sum({key: n for found in reached.values() for key, n in found.items()}.values())
        shallow = [i for i in live if sum(reached[i].values()) <= SHALLOW_SHARE * whole]
        deep = [i for i in live if i not in shallow]
        passes = [shallow, deep] if shallow and deep else [live]
        self._shallow = torch.tensor(shallow if len(passes) == 2 else [], dtype=torch.long)
        self.collecting = True
        try:
            for n, lanes in enumerate(passes):
                self._lanes = torch.tensor(lanes, dtype=torch.long)
                self._storing = len(passes) == 2 and n == 0
                self._arrived.clear()
                vector = torch.stack([losses[i].float() for i in lanes])
                # randomness "same": a checkpointed layer recomputed inside this pass draws its dropout
                # masks again, from the generator state its first forward had (torch's checkpoint
                # restores it), the same for every lane
                torch.vmap(differentiate(vector), randomness="same")(
                    torch.eye(len(lanes), dtype=vector.dtype, device=device)
                )
                for key, flat in list(self._pending.items()):  # a use never reached (its output did not matter)
                    del self._pending[key]
                    self._complete(key, flat)
                for key in list(self._outputs):
                    self._complete_output(key)
            for flat in self._stored.values():  # parameters only the shallow losses reach
                self._add(flat, self._shallow)
            for key, kept in self._stored_outputs.items():
                self._add_output(key, list(kept.values()), self._shallow)
            return self._gram.cpu()
        finally:
            self.collecting = False
            self._storing = False
            self._gram = None
            self.reset()
