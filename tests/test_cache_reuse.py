"""The teacher cache's prefix reuse: a frame's prefix (preamble and images) run once, its questions
after the prefix's KV cache, give the whole forward's targets to fp32 rounding, for both families,
every signal kind, padded micro-batches and questions of different lengths; samples that share no
prefix run whole."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from drivekd.data.formats import load_split
from drivekd.distill.cache import frame_prefix, prefix_groups
from drivekd.distill.signals import make_signal

# every signal kind the recipes use (attn_full is attn_group's class at one layer)
SIGNALS = {
    "tv_first": make_signal("attn_tv", layer=0),
    "group": make_signal("attn_group", layers=(0, -2)),
    "full_last": make_signal("attn_full", layer=-1),
    "tv_late": make_signal("attn_tv", layer=-2),
    "hidden": make_signal("hidden", layers=(0, -2)),
    "kl": make_signal("logit_kl", temperature=2.0),
}
FAMILIES = ["internvl", "qwen25vl"]
# largest |reused - whole| over the stored values, as a fraction of the largest |whole| (observed:
# maps <= 4e-9, hidden states and logits <= 6e-7 of their largest value, both families)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def frame(data_dir) -> list:
    """One frame's questions (the first scene's), of several lengths."""
    samples = load_split(data_dir, "train")
    mine = [s for s in samples if s.scene_id == samples[0].scene_id]
    assert len(mine) >= 5
    return mine


def _teachers(family: str):
    from drivekd.distill.teachers import LiveTeachers
    from drivekd.models.loading import load_backend

    student = load_backend(f"tiny-{family}-student")
    return LiveTeachers(SIGNALS, dict.fromkeys(SIGNALS, f"tiny-{family}-teacher"), student)


def _stored(teachers, batch, targets) -> dict[tuple[int, str], torch.Tensor]:
    """What a cache stores of each sample's targets (trimmed to its length: padding is never read)."""
    counts = batch.inputs["attention_mask"].sum(1).tolist()
    return {
        (b, f"{name}/{k}"): sig.stored(target[b], counts[b], batch.visual_mask[b, : counts[b]])
        for b in range(len(batch))
        for name, sig in teachers.signals.items()
        for k, target in enumerate(targets[name])
    }


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        assert a[key].shape == b[key].shape, key
        worst = max(worst, float((a[key] - b[key]).abs().max() / a[key].abs().max().clamp_min(1e-30)))
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_questions_after_a_frames_prefix_get_the_whole_forwards_targets(family, frame):
    teachers = _teachers(family)
    student = teachers.student
    one = student.build_batch(frame[:1])
    _, length, _ = frame_prefix(one.inputs["input_ids"][0], one.visual_mask[0], [])
    prefix = teachers.run_prefix(one, length)
    lengths = [student.token_lengths(s) for s in frame]
    assert len(set(lengths)) > 1  # the frame's questions differ in length: suffixes are right-padded
    for chunk in (frame[:3], frame[3:6], frame[-1:]):  # padded batches of 3, and a batch of one
        batch = student.build_batch(chunk)
        assert bool((batch.inputs["attention_mask"] == 0).any()) or len(chunk) == 1
        whole = _stored(teachers, batch, teachers.targets(batch))
        reused = _stored(teachers, batch, teachers.targets(batch, prefix))
        assert _worst(whole, reused) <= TOLERANCE
        # the prefix's rows are copied, not recomputed per batch: every sample holds the same bits
        for key in reused:
            if key[0] > 0 and key[1].startswith("group/"):
                assert torch.equal(reused[key][:length, :length], reused[(0, key[1])][:length, :length])


def test_qwen_suffix_positions_continue_the_images_m_rope_positions(frame, monkeypatch):
    """The check above can fail: Qwen2.5-VL's text after the images sits at positions the images'
    3-D rotary index shifts, and a suffix run at its plain token index gets other targets."""
    from drivekd.models.qwen25vl import Qwen25VLBackend

    teachers = _teachers("qwen25vl")
    student = teachers.student
    one = student.build_batch(frame[:1])
    _, length, _ = frame_prefix(one.inputs["input_ids"][0], one.visual_mask[0], [])
    batch = student.build_batch(frame[:3])
    positions = student.position_ids(batch.inputs)
    index = torch.arange(batch.inputs["input_ids"].shape[1])
    assert not torch.equal(positions[0, 0, length:], index[length:])  # not the token index
    whole = _stored(teachers, batch, teachers.targets(batch))
    prefix = teachers.run_prefix(one, length)

    def token_index(self, inputs):
        size, width = inputs["input_ids"].shape
        return torch.arange(width).expand(3, size, width)

    monkeypatch.setattr(Qwen25VLBackend, "position_ids", token_index)
    assert _worst(whole, _stored(teachers, batch, teachers.targets(batch, prefix))) > 1e-3


def test_a_batch_that_does_not_start_with_the_prefix_is_refused(frame):
    teachers = _teachers("internvl")
    student = teachers.student
    one = student.build_batch(frame[:1])
    _, length, _ = frame_prefix(one.inputs["input_ids"][0], one.visual_mask[0], [])
    prefix = teachers.run_prefix(one, length)
    other = dataclasses.replace(frame[2], id="own-text", question="Look first. " + frame[2].question)
    with pytest.raises(ValueError, match="start with the prefix"):
        teachers.targets(student.build_batch([frame[1], other]), prefix)


def test_prefix_groups_take_frames_and_leave_samples_that_share_no_prefix_whole(frame):
    from drivekd.models.loading import load_backend

    student = load_backend("tiny-internvl-student")
    no_images = dataclasses.replace(frame[0], id="no-images", question="Is the road empty?", images=[])
    own_text = dataclasses.replace(frame[1], id="own-text", question="Look first. " + frame[1].question)
    samples = [frame[0], no_images, frame[1], own_text, frame[2], frame[3]]
    groups, alone = prefix_groups(student, samples)
    assert groups == [[0, 2, 4, 5]]  # the frame's questions, in order
    assert alone == [1, 3]  # no images; text before the images (a prefix of its own)
    assert prefix_groups(student, [frame[0], no_images]) == ([], [0, 1])  # a frame of one question


def _config(tmp_path: Path, data_dir: Path, family: str) -> Path:
    recipe = tmp_path / "every-kind.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "perception": {"kind": "attn_tv", "layer": 0},
                "reasoning": {"kind": "attn_group", "layers": [0, -2]},
                "planning": {"kind": "hidden", "layer": -2},
                "kd": {"kind": "logit_kl", "temperature": 2.0, "capability": "all"},
            }
        )
    )
    raw = {
        "model": {"name": f"tiny-{family}-student"},
        "teacher": f"tiny-{family}-teacher",
        "recipe": str(recipe),
        "data": {"path": str(data_dir)},
        "train": {"output_dir": str(tmp_path / "run"), "micro_batch_size": 3},
    }
    file = tmp_path / "distill.yaml"
    file.write_text(yaml.safe_dump(raw))
    return file


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_a_cache_written_with_prefix_reuse_reads_back_the_whole_forwards_targets(tmp_path, data_dir, family):
    from drivekd.distill.cache import TeacherCache
    from drivekd.distill.run import run_cache_teacher
    from drivekd.train.config import DistillConfig, load_config

    cfg = load_config(DistillConfig, _config(tmp_path, data_dir, family))
    made = {
        reuse: run_cache_teacher(cfg, tmp_path / f"reuse-{reuse}", reuse_prefix=reuse, echo=lambda _: None)
        for reuse in (True, False)
    }
    reused, whole = TeacherCache(made[True]), TeacherCache(made[False])
    manifest = json.loads((made[True] / "manifest.json").read_text())
    questions = len(manifest["index"])
    assert manifest["prefix_reuse"] is True and not whole.manifest["prefix_reuse"]
    assert whole.manifest["after_prefix"] == 0
    # every question of the data's frames (about 8 each) ran after its frame's prefix, and all of
    # them share the stored prefix (its rows are the same bits for the whole frame)
    assert manifest["after_prefix"] == questions == len(manifest["prefixes"])
    assert manifest["teacher_seconds"] > 0
    keys = [
        f"{n}/{k}" for n in ("perception", "reasoning", "planning", "kd") for k in range(3 if n == "reasoning" else 1)
    ]
    worst = 0.0
    for sample_id in whole.manifest["index"]:
        for key in keys:
            a, b = whole.tensors(sample_id, key).float(), reused.tensors(sample_id, key).float()
            assert a.shape == b.shape, (sample_id, key)
            worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)))
    # fp16 storage: a value rounded either side of a half-ulp boundary differs by one fp16 ulp
    assert worst <= 2**-10
