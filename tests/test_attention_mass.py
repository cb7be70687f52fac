import pytest
import torch

from drivekd.data.drivesim.generate import GenerateConfig, generate
from drivekd.data.formats import load_split
from drivekd.eval.attention import tagged_attention
from drivekd.models.backend import IGNORE_INDEX
from drivekd.models.loading import load_backend


def test_tagged_attention_equals_a_slow_eager_reference(tmp_path):
    generate(tmp_path / "d", GenerateConfig(scenes=3, seed=5))
    backend = load_backend("tiny-internvl-student")
    samples = load_split(tmp_path / "d", "train")
    got = tagged_attention(backend, samples, batch_size=3)
    assert got["items"] > 0 and len(got["ratio"]) == backend.num_layers
    # slow reference: one sample at a time, eager attentions, plain loops
    backend.set_attention("eager")
    mass = [0.0] * backend.num_layers
    chance = [0.0] * backend.num_layers
    n = 0
    for s in samples:
        b = backend.build_batch([s])
        if not b.tag_mask.any():
            continue
        with torch.no_grad():
            att = backend.model(**b.inputs, output_attentions=True).attentions
        labels, dec = b.labels[0], b.decision_mask[0]
        rows = [
            q
            for q in range(len(labels) - 1)
            if (dec.any() and dec[q + 1]) or (not dec.any() and labels[q + 1] != IGNORE_INDEX)
        ]
        tag = [k for k in range(len(labels)) if b.tag_mask[0, k]]
        vis = [k for k in range(len(labels)) if b.visual_mask[0, k]]
        for layer, a in enumerate(att):
            m = a[0].mean(0)
            mass[layer] += sum(float(m[q, tag].sum()) for q in rows) / len(rows)
            chance[layer] += sum(float(m[q, vis].sum()) * len(tag) / len(vis) for q in rows) / len(rows)
        n += 1
    backend.set_attention("sdpa")
    assert n == got["items"]
    assert got["mass"] == pytest.approx([m / n for m in mass], abs=1e-5)
    assert got["chance"] == pytest.approx([c / n for c in chance], abs=1e-5)
