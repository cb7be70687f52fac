"""Which question types does a model answer from the image? Per-type image gain on a split.

    python scripts/image_gain.py MODEL DATA_DIR [SPLIT] [LIMIT]

For each sample, answer-token cross-entropy with its own images and with another scene's images
(`drivekd.data.sample.with_other_images`, the control `train.val_other_images` logs as one number);
printed per question type: the mean difference over all answer tokens and over the `Final: {...}`
span. Near 0 everywhere means the model answers from the text alone. Not part of the test suite.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import torch

from drivekd.data.formats import load_split
from drivekd.data.sample import Sample, with_other_images
from drivekd.models.backend import IGNORE_INDEX, VLMBackend
from drivekd.models.loading import load_backend
from drivekd.train.sft import token_nll


@torch.no_grad()
def per_sample_ce(backend: VLMBackend, samples: list[Sample], batch_size: int = 16) -> list[tuple[float, float | None]]:
    """(mean CE over answer tokens, mean CE over the decision span or None without one) per sample."""
    out = []
    for i in range(0, len(samples), batch_size):
        batch = backend.build_batch(samples[i : i + batch_size])
        nll, labels = token_nll(backend.model, batch)
        answer = (labels != IGNORE_INDEX).float()
        decision = batch.decision_mask[:, 1:].float()
        whole = (nll * answer).sum(1) / answer.sum(1)
        span_len = decision.sum(1)
        span = ((nll * decision).sum(1) / span_len.clamp_min(1)).tolist()
        out += [(w, sp if n else None) for w, sp, n in zip(whole.tolist(), span, span_len.tolist(), strict=True)]
    return out


def main(model: str, data: str, split: str = "val", limit: str = "256") -> None:
    backend = load_backend(model)
    backend.model.eval()
    samples = load_split(data, split)[: int(limit)]
    own = per_sample_ce(backend, samples)
    other = per_sample_ce(backend, with_other_images(samples))
    gains: dict[str, list[tuple[float, float | None]]] = defaultdict(list)
    for s, (a, a_span), (o, o_span) in zip(samples, own, other, strict=True):
        span_gain = None if a_span is None or o_span is None else o_span - a_span
        for key in (s.question_type, "ALL"):
            gains[key].append((o - a, span_gain))
    # Answers without a `Final: {...}` span (grounding items, captions) show "–", not a misleading 0.
    print(f"{'question type':24s} {'n':>4s} {'gain, answer':>13s} {'gain, Final span':>17s}  (nats/token)")
    for key, rows in sorted(gains.items(), key=lambda kv: (kv[0] == "ALL", kv[0])):
        spans = [r[1] for r in rows if r[1] is not None]
        span = f"{sum(spans) / len(spans):+17.4f}" if spans else f"{'–':>17s}"
        print(f"{key:24s} {len(rows):4d} {sum(r[0] for r in rows) / len(rows):+13.4f} {span}")


if __name__ == "__main__":
    main(*sys.argv[1:])
