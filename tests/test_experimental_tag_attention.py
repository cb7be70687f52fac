"""Tag attention, experimental: `drivekd experimental sft-tag-attention` (its loss: tests/test_models.py)."""

import json

import pytest
import yaml

from drivekd.errors import DriveKDError
from drivekd.experimental.config import TagAttentionSFTConfig
from drivekd.experimental.tag_attention import run_sft_tag_attention
from drivekd.train.config import DistillConfig, SFTConfig, load_config

from .conftest import run_cli


def _write(tmp_path, train=None, **fields):
    raw = {
        "model": {"name": "tiny-internvl-student"},
        "data": {"path": "d"},
        "train": {"output_dir": "o", **(train or {})},
        **fields,
    }
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_its_section_and_the_fields_it_replaced(tmp_path):
    c = load_config(TagAttentionSFTConfig, _write(tmp_path, tag_attention={"weight": 0.2}), ["tag_attention.layer=-2"])
    assert (c.tag_attention.weight, c.tag_attention.layer) == (0.2, -2)
    assert load_config(TagAttentionSFTConfig, _write(tmp_path)).tag_attention.layer is None  # the middle layer
    with pytest.raises(DriveKDError, match=r"c.yaml: `train.tag_attention_weight` is `tag_attention.weight`"):
        load_config(TagAttentionSFTConfig, _write(tmp_path, {"tag_attention_weight": 1.0}))
    with pytest.raises(DriveKDError, match=r"tag_attention.weight: Input should be greater than 0"):
        load_config(TagAttentionSFTConfig, _write(tmp_path, tag_attention={"weight": 0}))
    # the product configs refuse the old fields: SFT naming the command, distillation (which never
    # read them) saying it has no such loss rather than pointing at a command that refuses its file
    for key in ("tag_attention_weight", "tag_attention_layer"):
        file = _write(tmp_path, {key: 1})
        with pytest.raises(DriveKDError) as info:
            load_config(SFTConfig, file)
        assert str(info.value) == (
            f"{file}: `train.{key}` moved to an experimental SFT command: run `drivekd experimental "
            f"sft-tag-attention --config {file}` with the section `tag_attention: {{weight, layer}}`"
        )
        file = _write(tmp_path, {key: 1}, teacher="T")
        with pytest.raises(DriveKDError) as info:
            load_config(DistillConfig, file)
        assert str(info.value) == (
            f"{file}: `train.{key}` is an SFT loss (now the experimental `drivekd experimental "
            "sft-tag-attention`); a distillation run has no tag-attention loss"
        )


@pytest.mark.integration
def test_a_layer_outside_the_model_is_a_one_line_error(tmp_path, data_dir):
    cfg = _write(tmp_path, {"output_dir": str(tmp_path / "run")}, data={"path": str(data_dir), "limit": 8})
    r = run_cli("experimental", "sft-tag-attention", "--config", str(cfg), "tag_attention.layer=9")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: tag_attention.layer=9: the model has 4 LM layers (use 0..3, or negative from the end)"
    ]


@pytest.mark.integration
def test_a_run_logs_the_loss_beside_the_ce(tmp_path, data_dir):
    train = {"output_dir": str(tmp_path / "run"), "micro_batch_size": 4, "max_steps": 2, "log_every": 1}
    cfg = load_config(TagAttentionSFTConfig, _write(tmp_path, train, data={"path": str(data_dir), "limit": 8}))
    final = run_sft_tag_attention(cfg)
    rows = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "ce" in r]
    assert len(trained) == 2 and all("tag_attention" in r and r["tag_attention"] > 0 for r in trained)
    assert yaml.safe_load((final.parent / "config.yaml").read_text())["tag_attention"] == {"weight": 1.0, "layer": None}
