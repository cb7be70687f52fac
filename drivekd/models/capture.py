"""Selective attention capture: head-averaged attention maps of chosen LM layers only.

A custom attention function registered through `transformers.AttentionInterface` receives the
module, so it knows which layer it serves. Every layer's output stays on SDPA; a layer a recipe needs
also computes its head-mean map from q and k, one head at a time, and for a student under activation
checkpointing (the graph keeps q and k, the backward pass recomputes the softmax). Text->vision
signals ask for the text rows only: `(B, R, T)` instead of `(B, T, T)`. Padding keys get zero
probability through the additive mask.

A distiller passes `losses`: per captured (layer, "full" | "rows"), functions from the map to a
per-sample loss. Such a layer keeps no map: its losses are computed inside the layer's forward, under
the same checkpoint as the map, so the graph keeps only q and k (not a `(B, T, T)` map and the loss's
saved difference per layer), and in the backward pass each layer's map gradient is made when the pass
reaches that layer, not up front for every layer at once (k-fold under the `gram: modules` pass).

A student under activation checkpointing runs a captured layer's forward again in the backward pass,
after the capture block has closed: `replay` arms the capture again as it was when the layer first ran
(models/checkpointing.py), so the recompute saves what the first forward saved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from drivekd.models.backend import VLMBackend

IMPLEMENTATION = "drivekd_capture"

MapLoss = Callable[[torch.Tensor], torch.Tensor]  # a captured map -> a per-sample loss (B,)


class CapturedMaps(dict):
    """Layer -> head-mean map `(B, T, T)` (or `(B, H, T, T)` per head); `rows` holds the layers captured
    for their text rows only, `(B, R, T)`, at the positions `row_index` `(B, R)` (see `text_rows`);
    `losses` the `(n, B)` losses of the layers captured for their `MapLoss`es (the map not kept)."""

    def __init__(
        self,
        row_index: torch.Tensor | None = None,
        consumers: Mapping[tuple[int, str], Sequence[MapLoss]] | None = None,
    ) -> None:
        super().__init__()
        self.rows: dict[int, torch.Tensor] = {}
        self.row_index = row_index
        self.consumers = dict(consumers or {})
        self.losses: dict[tuple[int, str], torch.Tensor] = {}
        self._additive: tuple[torch.Tensor | None, tuple[object, ...], torch.Tensor] | None = None

    def additive(
        self, mask: torch.Tensor | None, q_len: int, k_len: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """`_additive` of the layer's mask, made once per forward: every layer receives the same mask
        tensor, and each conversion is a `(B, 1, T, T)` map that a checkpointed layer keeps until its
        backward. The mask held here cannot be freed, so `is` cannot match a new tensor at its address."""
        shape = (q_len, k_len, dtype, device)
        if self._additive is not None and self._additive[0] is mask and self._additive[1] == shape:
            return self._additive[2]
        additive = _additive(mask, q_len, k_len, dtype, device)
        self._additive = (mask, shape, additive)
        return additive

    def scratch(self) -> CapturedMaps:
        """An empty sink reading as this one does (rows, consumers, the forward's additive mask): where a
        checkpointed layer's recompute puts what it captures again (models/checkpointing.py)."""
        other = CapturedMaps(self.row_index, self.consumers)
        other._additive = self._additive
        return other


@dataclass(frozen=True)
class _Wanted:
    sink: CapturedMaps
    layer: int
    full: bool  # the whole (T, T) map
    rows: bool  # the text rows only
    per_head: bool


_ACTIVE: dict[int, _Wanted] = {}  # id(attention module) -> what to capture there
# each capture block open now, innermost last: the model and what its block captures where
_ARMED: list[tuple[PreTrainedModel, dict[int, _Wanted]]] = []


def text_rows(attention_mask: torch.Tensor, visual_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The text (non-visual, non-padding) positions of each sample, in order: `(index, valid)`, both
    `(B, R)` with R the batch's most text tokens; a short sample's index repeats its last text position
    where `valid` is False. Text->vision signals read only these rows of a map."""
    text = attention_mask.bool() & ~visual_mask.bool()
    counts = text.sum(1)
    width = max(int(counts.max()), 1) if counts.numel() else 1
    # a stable sort puts each sample's text positions first, in order
    order = torch.sort((~text).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=text.device)[None, :] < counts[:, None]
    last = order.gather(1, (counts - 1).clamp_min(0)[:, None])
    return torch.where(valid, order, last), valid


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def _head_mean(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scale: float, groups: int) -> torch.Tensor:
    """Mean over heads of softmax(q k^T * scale + mask) in fp32, one head at a time: the peak is one
    `(B, R, T)` map, not `(B, H, R, T)`."""
    heads = query.shape[1]
    total = None
    for h in range(heads):
        # in place: no autograd node saves the product, and every (B, R, T) buffer not allocated is one
        # the allocator need not fault in again at each step's peak
        logits = torch.matmul(query[:, h], key[:, h // groups].transpose(1, 2)).float()
        probs = torch.softmax(logits.mul_(scale).add_(mask[:, 0].float()), dim=-1)
        if total is None:
            total = probs
        elif h == 1:
            total = total + probs  # the first head's probabilities are saved for the softmax's backward
        else:
            total.add_(probs)
    assert total is not None
    # a single head's total is its (saved) probabilities: divided out of place
    return total.div_(heads) if heads > 1 else total / heads


def _map(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scale: float, groups: int) -> torch.Tensor:
    """The head-mean map; with gradients, recomputed in the backward pass (the graph keeps q and k,
    not every head's probabilities), so a captured student layer costs one map, not H."""
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        return checkpoint(_head_mean, query, key, mask, scale, groups, use_reentrant=False)
    return _head_mean(query, key, mask, scale, groups)


def _map_losses(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    groups: int,
    dtype: torch.dtype,
    losses: Sequence[MapLoss],
) -> torch.Tensor:
    smap = _head_mean(query, key, mask, scale, groups).to(dtype)
    return torch.stack([loss(smap) for loss in losses])


def _fused(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scale: float, groups: int, losses: Sequence[MapLoss]
) -> torch.Tensor:
    """`(n, B)`: each loss of the layer's head-mean map; with gradients the map is recomputed in the
    backward pass, and nothing map-sized outlives the layer's forward."""
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        return checkpoint(_map_losses, query, key, mask, scale, groups, query.dtype, losses, use_reentrant=False)
    return _map_losses(query, key, mask, scale, groups, query.dtype, losses)


def capture_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # the layer's output is always SDPA's; a captured layer computes its map beside it from q and k
    out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    wanted = _ACTIVE.get(id(module))
    if wanted is None:
        return out
    groups = getattr(module, "num_key_value_groups", 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    sink, layer = wanted.sink, wanted.layer
    mask = sink.additive(attention_mask, query.shape[2], key.shape[2], query.dtype, query.device)
    if wanted.per_head:  # every head's map, with the graph (tag attention supervises one head)
        k = _repeat_kv(key, groups)
        logits = torch.matmul(query, k.transpose(2, 3)).float() * scale + mask.float()
        sink[layer] = torch.softmax(logits, dim=-1).to(query.dtype)
        return out
    if wanted.full:
        consumers = sink.consumers.get((layer, "full"))
        if consumers:
            sink.losses[(layer, "full")] = _fused(query, key, mask, scale, groups, consumers)
        else:
            sink[layer] = _map(query, key, mask, scale, groups).to(query.dtype)
    if wanted.rows:
        index = sink.row_index
        assert index is not None
        b, h, _, d = query.shape
        rows = index.to(query.device)
        q_rows = query.gather(2, rows[:, None, :, None].expand(b, h, rows.shape[1], d))
        m = mask.expand(b, -1, -1, -1)
        m_rows = m.gather(2, rows[:, None, :, None].expand(b, m.shape[1], rows.shape[1], m.shape[3]))
        consumers = sink.consumers.get((layer, "rows"))
        if consumers:
            sink.losses[(layer, "rows")] = _fused(q_rows, key, m_rows, scale, groups, consumers)
        else:
            sink.rows[layer] = _map(q_rows, key, m_rows, scale, groups).to(query.dtype)
    return out


AttentionInterface.register(IMPLEMENTATION, capture_attention_forward)
# SDPA-style masks (boolean, or None for plain causal): layers that are not captured keep SDPA's
# fast causal path; captured layers turn the mask into an additive one themselves.
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


def _additive(
    mask: torch.Tensor | None, q_len: int, k_len: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(B or 1, 1, q, k) additive mask from an SDPA boolean mask, or the causal one when it is None.
    After a KV cache (q < k) the queries are the last q positions: query i sees keys up to k - q + i,
    so a map captured there holds exactly the rows of the whole sequence's map after the cache."""
    if mask is None:
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)[None, None]
    elif mask.dtype == torch.bool:
        keep = mask[:, :, :, :k_len]
    else:
        return mask[:, :, :, :k_len]
    return torch.where(keep, torch.zeros((), dtype=dtype, device=device), torch.finfo(dtype).min)


def language_layers(backend: VLMBackend) -> list[torch.nn.Module]:
    """The attention modules of the language model, in depth order."""
    return [layer.self_attn for layer in backend.language_model.layers]


def resolve_layer(index: int, num_layers: int) -> int:
    resolved = index + num_layers if index < 0 else index
    if not 0 <= resolved < num_layers:
        raise ValueError(f"layer {index} is out of range for a model with {num_layers} layers")
    return resolved


@contextlib.contextmanager
def capture(
    backend: VLMBackend,
    layers: Iterable[int],
    *,
    per_head: bool = False,
    row_layers: Iterable[int] = (),
    row_index: torch.Tensor | None = None,
    losses: Mapping[tuple[int, str], Sequence[MapLoss]] | None = None,
) -> Iterator[CapturedMaps]:
    """Within the block, forward passes store head-mean maps `(B, T, T)` of `layers` in the yielded dict
    (`per_head`: every head's map, `(B, H, T, T)`), and the maps of `row_layers` for the rows
    `row_index` `(B, R)` only, `(B, R, T)`, in its `rows` (memory grows with R x T, not T x T).
    `losses` (keys `(layer, "full" | "rows")`, layers resolved) turns those captures into the losses
    of their maps, in the yielded `losses`, instead of the maps.

    The language model switches to the capture implementation for the duration (SDPA elsewhere, and
    for every layer's output), and back to its previous implementation afterwards.
    """
    modules = language_layers(backend)
    full = {resolve_layer(i, len(modules)) for i in layers}
    rows = {resolve_layer(i, len(modules)) for i in row_layers}
    if rows and row_index is None:
        raise ValueError("row_layers need a row_index")
    sink = CapturedMaps(row_index, losses)
    wanted = {id(modules[i]): _Wanted(sink, i, full=i in full, rows=i in rows, per_head=per_head) for i in full | rows}
    with _armed(backend.model, wanted):
        _ARMED.append((backend.model, wanted))
        try:
            yield sink
        finally:
            _ARMED.pop()


@contextlib.contextmanager
def _armed(model: PreTrainedModel, wanted: Mapping[int, _Wanted]) -> Iterator[None]:
    """The language model on the capture implementation and `wanted` active, both as before afterwards."""
    before = {key: _ACTIVE.get(key) for key in wanted}
    previous = model.config.text_config._attn_implementation
    _ACTIVE.update(wanted)
    model.set_attn_implementation({"text_config": IMPLEMENTATION})
    try:
        yield
    finally:
        for key, old in before.items():
            if old is None:
                _ACTIVE.pop(key, None)
            else:
                _ACTIVE[key] = old
        model.set_attn_implementation({"text_config": previous})


def armed_now() -> list[tuple[PreTrainedModel, dict[int, _Wanted]]]:
    """The capture blocks open now (what a checkpointed layer's recompute must arm again), each sink
    replaced by an empty one reading as it does: the recompute's context lives in the graph, and a
    block's own sink holds the graph's losses (a cycle through autograd's nodes, which the garbage
    collector cannot see, would keep a graph never backpropagated alive)."""
    return [(model, _on_scratch_sinks(wanted)) for model, wanted in _ARMED]


@contextlib.contextmanager
def replay(armed: Sequence[tuple[PreTrainedModel, Mapping[int, _Wanted]]]) -> Iterator[None]:
    """Capture armed as `armed` (`armed_now()` when a checkpointed layer first ran) for the layer's
    recompute in the backward pass: the same maps and losses computed in the same order, so the
    recompute saves what the first forward saved, into fresh sinks that go with the recompute."""
    with contextlib.ExitStack() as stack:
        for model, wanted in armed:
            stack.enter_context(_armed(model, _on_scratch_sinks(wanted)))
        yield


def _on_scratch_sinks(wanted: Mapping[int, _Wanted]) -> dict[int, _Wanted]:
    """`wanted` writing into empty sinks that read as its own do (one per sink, shared as before)."""
    scratch: dict[int, CapturedMaps] = {}
    again = {}
    for key, w in wanted.items():
        if id(w.sink) not in scratch:
            scratch[id(w.sink)] = w.sink.scratch()
        again[key] = replace(w, sink=scratch[id(w.sink)])
    return again
