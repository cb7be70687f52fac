"""Tag attention, an experimental SFT objective (`drivekd experimental sft-tag-attention`).

The answer CE plus a loss that teaches a model from scratch where to look: one head's attention from
the committed answer onto the visual token under the object the sample is about (docs/configuration.md,
"Tag attention"). It plugs into the product's SFT run as its objective (`run_sft(..., objective=)`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from drivekd.errors import DriveKDError
from drivekd.experimental.config import TagAttentionConfig, TagAttentionSFTConfig
from drivekd.models.backend import IGNORE_INDEX, Batch, VLMBackend
from drivekd.models.capture import capture, resolve_layer
from drivekd.train.sft import cross_entropy, run_sft
from drivekd.train.trainer import Objective


def with_tag_attention(
    objective: Objective,
    backend: VLMBackend,
    *,
    weight: float,
    layer: int,
) -> Objective:
    """Add `tag_attention`: −log of the attention mass (head 0 of LM layer `layer`) that the
    positions predicting the committed answer (`Final: {...}`, else every answer token) put on the
    visual token of the object the sample is about (`Batch.tag_mask`).

    A tiny VLM trained from scratch does not learn, in any budget we can afford, to go from a tag's
    printed coordinates to the visual token they point at (docs/teacher-study.md, "Direct test"). The tag itself says
    where to look, so this supervises the lookup directly. Only the committed answer is supervised:
    on every token of a long answer, one layer made to stare at one token cannot do its other work
    and the answer CE suffers (docs/teacher-study.md). For the same reason one head is supervised,
    not the head mean: the layer's other heads stay free.
    """
    layer = resolve_layer(layer, backend.num_layers)

    def objective_with_grounding(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.tag_mask is None or not bool(batch.tag_mask.any()):
            return objective(model, batch)
        with capture(backend, [layer], per_head=True) as maps:
            losses = objective(model, batch)
        queries = batch.labels[:, 1:] != IGNORE_INDEX
        if batch.decision_mask is not None:  # where there is a `Final: {...}`, only its tokens look
            decision = batch.decision_mask[:, 1:]
            queries = torch.where(decision.any(1, keepdim=True), decision, queries)
        queries = queries & batch.tag_mask.any(1, keepdim=True)
        mass = torch.einsum("bqk,bk->bq", maps[layer][:, 0, :-1].float(), batch.tag_mask.float())
        losses["tag_attention"] = weight * -mass[queries].clamp_min(1e-6).log().mean()
        return losses

    return objective_with_grounding


def tag_attention_objective(config: TagAttentionConfig) -> Callable[[VLMBackend], Objective]:
    """The CE with tag attention, for the model `run_sft` loads (its layer checked against that model)."""

    def build(backend: VLMBackend) -> Objective:
        layer = backend.num_layers // 2 if config.layer is None else config.layer
        if not -backend.num_layers <= layer < backend.num_layers:
            raise DriveKDError(
                f"tag_attention.layer={layer}: the model has {backend.num_layers} LM layers "
                f"(use 0..{backend.num_layers - 1}, or negative from the end)"
            )
        return with_tag_attention(cross_entropy, backend, weight=config.weight, layer=layer)

    return build


def run_sft_tag_attention(config: TagAttentionSFTConfig, *, resume: bool = False) -> Path:
    return run_sft(config, resume=resume, objective=tag_attention_objective(config.tag_attention))
