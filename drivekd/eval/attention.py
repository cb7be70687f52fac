"""Where a model looks when it commits to an answer: the mechanism Drive-KD is meant to transfer.

For every sample about one object (a tagged vehicle, or the one its answer names), the head-mean
attention mass that the positions predicting the committed answer (`Final: {...}`, else every answer
token) put on the visual token under that object, per LM layer, beside what an even spread over the
visual tokens would give it ("chance"). A teacher that reads the tagged vehicle puts several times
chance there; distillation should move a student's mass toward the teacher's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from drivekd.data.sample import Sample
from drivekd.models.backend import IGNORE_INDEX, VLMBackend


@torch.no_grad()
def tagged_attention(backend: VLMBackend, samples: Sequence[Sample], *, batch_size: int = 8) -> dict[str, Any]:
    """{"items", "mass": [per layer], "chance": [per layer], "ratio": [per layer], "mean_ratio"}; items
    without a located object are skipped (None figures when none is left)."""
    from drivekd.models.capture import capture

    layers = list(range(backend.num_layers))
    mass = torch.zeros(len(layers), dtype=torch.float64)
    chance = torch.zeros(len(layers), dtype=torch.float64)
    items = 0
    backend.model.eval()
    for i in range(0, len(samples), batch_size):
        batch = backend.build_batch(samples[i : i + batch_size]).to(backend.device)
        has_tag = batch.tag_mask.any(1)
        if not bool(has_tag.any()):
            continue
        with capture(backend, layers) as maps:
            backend.model(**batch.inputs)
        queries = batch.labels[:, 1:] != IGNORE_INDEX  # positions whose next token is an answer token
        decision = batch.decision_mask[:, 1:]
        queries = torch.where(decision.any(1, keepdim=True), decision, queries) & has_tag[:, None]
        visual = batch.visual_mask.float()
        per_visual = 1.0 / visual.sum(1).clamp_min(1.0)  # even spread: each visual token's share of the mass
        tag = batch.tag_mask.float()
        for j, layer in enumerate(layers):
            rows = maps[layer][:, :-1].float()  # (B, T-1, T): attention of each predicting position
            on_tag = torch.einsum("bqk,bk->bq", rows, tag)
            on_visual = torch.einsum("bqk,bk->bq", rows, visual)
            even = on_visual * (tag.sum(1) * per_visual)[:, None]
            per_sample_tag = (on_tag * queries).sum(1) / queries.sum(1).clamp_min(1)
            per_sample_even = (even * queries).sum(1) / queries.sum(1).clamp_min(1)
            mass[j] += float(per_sample_tag[has_tag].sum())
            chance[j] += float(per_sample_even[has_tag].sum())
        items += int(has_tag.sum())
    if items == 0:
        return {"items": 0, "mass": None, "chance": None, "ratio": None, "mean_ratio": None}
    mass, chance = mass / items, chance / items
    ratio = (mass / chance.clamp_min(1e-12)).tolist()
    return {
        "items": items,
        "mass": [round(x, 6) for x in mass.tolist()],
        "chance": [round(x, 6) for x in chance.tolist()],
        "ratio": [round(x, 3) for x in ratio],
        "mean_ratio": round(sum(ratio) / len(ratio), 3),
    }
