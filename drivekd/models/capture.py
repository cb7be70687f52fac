"""Selective attention capture: head-averaged attention maps of chosen LM layers only.

A custom attention function registered through `transformers.AttentionInterface` receives the
module, so it knows which layer it serves. Layers a recipe needs are computed eagerly (softmax
materialised, gradients flow for a student) and their head-mean map is kept; every other layer,
and the vision tower, keeps SDPA. Padding keys get zero probability through the additive mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from drivekd.models.backend import VLMBackend

IMPLEMENTATION = "drivekd_capture"
_ACTIVE: dict[int, tuple[dict[int, torch.Tensor], int, bool]] = {}  # id(module) -> (sink, layer, per head)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


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
    entry = _ACTIVE.get(id(module))
    if entry is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    sink, layer, per_head = entry
    groups = getattr(module, "num_key_value_groups", 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    attention_mask = _additive(attention_mask, query.shape[2], key.shape[2], query.dtype, query.device)
    if not torch.is_grad_enabled() and not per_head:
        return _per_head_no_grad(sink, layer, query, key, value, attention_mask, scale, groups)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    logits = torch.matmul(query, key.transpose(2, 3)) * scale + attention_mask
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    sink[layer] = probs if per_head else probs.mean(dim=1)
    probs_dropped = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs_dropped, value).transpose(1, 2).contiguous()
    return out, None


def _per_head_no_grad(
    sink: dict[int, torch.Tensor],
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    groups: int,
) -> tuple[torch.Tensor, None]:
    """Teachers need no graph: one head at a time keeps the peak at one `(B, T, T)` map, not `(B, H, T, T)`."""
    heads = query.shape[1]
    mask = attention_mask
    mean = torch.zeros(query.shape[0], query.shape[2], key.shape[2], dtype=torch.float32, device=query.device)
    out = torch.empty_like(query)
    for h in range(heads):
        kv = h // groups
        logits = torch.matmul(query[:, h], key[:, kv].transpose(1, 2)) * scale
        logits = logits + mask[:, 0]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        mean += probs
        out[:, h] = torch.matmul(probs.to(value.dtype), value[:, kv])
    sink[layer] = (mean / heads).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, capture_attention_forward)
# SDPA-style masks (boolean, or None for plain causal): layers that are not captured keep SDPA's
# fast causal path; captured layers turn the mask into an additive one themselves.
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


def _additive(
    mask: torch.Tensor | None, q_len: int, k_len: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(B or 1, 1, q, k) additive mask from an SDPA boolean mask, or the causal one when it is None."""
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
    backend: VLMBackend, layers: set[int] | list[int], *, per_head: bool = False
) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, forward passes store head-mean maps `(B, T, T)` of `layers` in the yielded dict
    (`per_head`: every head's map, `(B, H, T, T)`).

    The language model switches to the capture implementation for the duration (SDPA elsewhere),
    and back to its previous implementation afterwards.
    """
    modules = language_layers(backend)
    wanted = {resolve_layer(i, len(modules)) for i in layers}
    sink: dict[int, torch.Tensor] = {}
    text_config = backend.model.config.text_config
    previous = text_config._attn_implementation
    for i in wanted:
        _ACTIVE[id(modules[i])] = (sink, i, per_head)
    backend.model.set_attn_implementation({"text_config": IMPLEMENTATION})
    try:
        yield sink
    finally:
        for i in wanted:
            _ACTIVE.pop(id(modules[i]), None)
        backend.model.set_attn_implementation({"text_config": previous})
