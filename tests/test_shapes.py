"""Real-size architectures (`drivekd models init --like`): the published parameter counts, and a
checkpoint written by the same code path that loads and runs."""

import copy

import pytest
import torch
from safetensors import safe_open

from drivekd.data.formats import load_split
from drivekd.models.loading import LoadOptions, build_like, count_parameters, init_like, load_backend, real_shapes


@pytest.mark.parametrize("name", sorted(real_shapes()))
def test_published_parameter_counts(name):
    shape = real_shapes()[name]
    backend = build_like(name, meta=True)  # shapes only: nothing allocated
    assert count_parameters(backend) == shape["parameters"]
    assert backend.num_layers == shape["text"]["layers"] and backend.hidden_size == shape["text"]["hidden"]
    assert backend.vocab_size == shape["text"]["vocab"] >= len(backend.tokenizer)


def test_real_tokens_per_image():
    internvl = build_like("internvl3-1b", meta=True)
    assert internvl.visual_token_count(1600, 900) == 256  # one 448-px tile per image
    qwen = build_like("qwen2.5-vl-3b", meta=True)
    assert qwen.visual_token_count(448, 448) == 256  # (448 / 28)^2 after the 2 x 2 merge
    assert qwen.visual_token_count(1600, 900) == round(1600 / 28) * round(900 / 28)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["internvl3-1b", "qwen2.5-vl-3b"])
def test_init_like_writes_a_checkpoint_that_loads_and_runs(name, tmp_path, monkeypatch):
    """The published architecture at a small width (the same config builders and save path)."""
    from drivekd.data.drivesim.generate import GenerateConfig, generate
    from drivekd.models import loading

    shape = copy.deepcopy(real_shapes()[name])
    shape["text"].update(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)
    shape["vision"].update(hidden=32, intermediate=64, layers=2, heads=2)
    if "full_attention_blocks" in shape["vision"]:
        shape["vision"]["full_attention_blocks"] = [1]
    if "mrope_section" in shape["text"]:
        shape["text"]["mrope_section"] = [2, 3, 3]  # head_dim 16
    monkeypatch.setattr(loading, "real_shapes", lambda: {name: shape})
    out = init_like(name, tmp_path / "ckpt", LoadOptions(dtype="bfloat16", seed=3))
    generate(tmp_path / "data", GenerateConfig(scenes=2, seed=11))
    samples = load_split(tmp_path / "data", "train")[:2]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # written as asked
    backend = load_backend(str(out))
    assert backend.vocab_size == shape["text"]["vocab"]
    batch = backend.build_batch(samples)
    assert int(batch.visual_mask[0].sum()) == sum(backend.visual_tokens(samples[0]))
    with torch.no_grad():
        logits = backend.model(**batch.inputs).logits
    assert logits.shape[-1] == shape["text"]["vocab"] and torch.isfinite(logits.float()).all()
