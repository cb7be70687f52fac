"""Timed greedy decoding: first-token latency and decode time over the KV cache.

A manual loop rather than `model.generate`, so that prefill and the decode steps are timed apart. It
reproduces `generate` token for token (position ids as HF computes them, left padding included);
tested against it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt_positions(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The prompt's position ids exactly as `generate` builds them (2-D, or 4-D for Qwen2.5-VL mRoPE)."""
    prepare = getattr(model, "_prepare_position_ids_for_generation", None)
    if prepare is None:  # other transformers versions: let the model infer them (exact for batch 1)
        return None
    return prepare(inputs["input_ids"], dict(inputs))


@torch.no_grad()
def greedy_timed(backend: Any, batch: Any, new_tokens: int) -> tuple[torch.Tensor, float, float]:
    """Greedy decoding of exactly `new_tokens` tokens (EOS suppressed) with the KV cache.

    Returns (tokens (B, new_tokens), first_token_s, decode_s): first_token_s is the prefill forward
    plus the pick of the first token; decode_s the remaining `new_tokens - 1` steps.
    """
    model = backend.model
    device = backend.device
    was_training = model.training
    model.eval()
    inputs = dict(batch.inputs)
    mask = inputs["attention_mask"]
    positions = _prompt_positions(model, inputs)
    step_extra: dict[str, torch.Tensor] = {}
    if "mm_token_type_ids" in inputs:  # new tokens are text
        step_extra["mm_token_type_ids"] = inputs["mm_token_type_ids"].new_zeros((mask.shape[0], 1))

    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits[:, -1].float()
        logits[:, backend.eos_id] = -math.inf
        return logits.argmax(-1)

    _sync(device)
    start = time.perf_counter()
    kwargs = {} if positions is None else {"position_ids": positions}
    out = model(**inputs, **kwargs, use_cache=True, logits_to_keep=1)
    token = pick(out.logits)
    _sync(device)
    first = time.perf_counter()
    tokens = [token]
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        if positions is not None:
            positions = positions[..., -1:] + 1
            kwargs = {"position_ids": positions}
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            past_key_values=out.past_key_values,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
            **step_extra,
        )
        token = pick(out.logits)
        tokens.append(token)
    _sync(device)
    end = time.perf_counter()
    model.train(was_training)
    return torch.stack(tokens, dim=1), first - start, end - first
