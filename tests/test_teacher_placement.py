"""A teacher larger than one device: spread over devices, CPU memory and disk by accelerate, it gives
the targets it gives in memory."""

import pytest
import torch
import yaml

from drivekd.data.formats import load_split
from drivekd.distill.recipe import load_recipe
from drivekd.distill.teachers import LiveTeachers
from drivekd.errors import DriveKDError
from drivekd.models.loading import LoadOptions, load_backend
from drivekd.train.config import DistillConfig, load_config


@pytest.mark.integration
def test_a_teacher_offloaded_to_disk_gives_the_targets_it_gives_in_memory(tmp_path, data_dir, teacher_dir):
    spec = str(teacher_dir)
    student = load_backend("tiny-internvl-student")
    signals = load_recipe("drive-kd")
    samples = load_split(data_dir, "train")[:3]
    batch = student.build_batch(samples)
    teacher_of = dict.fromkeys(signals, spec)
    in_memory = LiveTeachers(signals, teacher_of, student, probe=samples)
    # a few hundred kB of CPU memory: most of the teacher goes to disk and is read back each forward
    placement = {"device_map": "auto", "max_memory": {"cpu": "300kB"}, "offload_folder": str(tmp_path / "offload")}
    spread = LiveTeachers(signals, teacher_of, student, probe=samples, placement=placement)
    model = spread.models[spec].model
    assert "disk" in set(model.hf_device_map.values()), model.hf_device_map
    assert any(p.device.type == "meta" for p in model.parameters())  # not in memory, truly
    want, got = in_memory.targets(batch), spread.targets(batch)
    assert want.keys() == got.keys() == signals.keys()
    for name in signals:
        assert len(want[name]) == len(got[name]) > 0
        for w, g in zip(want[name], got[name], strict=True):
            assert g.device == w.device and torch.equal(w, g), name


def test_a_teacher_placement_is_checked_when_the_config_is_read(tmp_path):
    base = {
        "model": {"name": "tiny-internvl-student"},
        "data": {"path": "d"},
        "train": {"output_dir": "o"},
    }
    file = tmp_path / "c.yaml"
    for teacher, match in (
        (
            {"name": "T", "max_memory": {0: "20GiB"}},
            "max_memory and offload_folder place a teacher spread by device_map",
        ),
        (
            {"name": "T", "device_map": "auto", "max_memory": {0: "20 gigs"}},
            r"teacher.max_memory.0: String should match",
        ),
        ({"name": "T", "device_map": "everywhere"}, "teacher.device_map"),
    ):
        file.write_text(yaml.safe_dump({**base, "teacher": teacher}))
        with pytest.raises(DriveKDError, match=match):
            load_config(DistillConfig, file)
    file.write_text(
        yaml.safe_dump(
            {**base, "teacher": {"name": "T", "device_map": "auto", "max_memory": {0: "70GiB", "cpu": "1.5TB"}}}
        )
    )
    placement = load_config(DistillConfig, file).teacher.placement()
    assert placement == {"device_map": "auto", "max_memory": {0: "70GiB", "cpu": "1.5TB"}, "offload_folder": None}
    with pytest.raises(DriveKDError, match="no LoRA"):
        load_backend("tiny-internvl-teacher", LoadOptions(device_map="auto", lora={"r": 2}))
    with pytest.raises(DriveKDError, match="a preset is built in memory"):
        load_backend("tiny-internvl-teacher", LoadOptions(device_map="auto"))


def test_a_placement_that_cannot_work_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    from drivekd.distill.recipe import check_recipe

    raw = {
        "model": {"name": "tiny-internvl-student"},
        "data": {"path": "d"},
        "train": {"output_dir": "o"},
        "teacher": {"name": "tiny-internvl-teacher", "device_map": "auto"},
    }
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump(raw))
    with pytest.raises(DriveKDError, match="tiny-internvl-teacher is a preset, built in memory"):
        check_recipe(load_config(DistillConfig, file))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DriveKDError, match="under torchrun every process would place its own copy"):
        check_recipe(load_config(DistillConfig, file))


def test_a_check_across_a_section_blames_the_override_that_set_it(tmp_path):
    file = tmp_path / "c.yaml"
    raw = {"model": {"name": "m"}, "data": {"path": "d"}, "train": {"output_dir": "o"}, "teacher": "T"}
    file.write_text(yaml.safe_dump(raw))
    with pytest.raises(DriveKDError, match=r"^override 'combine.project_per=step': combine: gram: modules cannot"):
        load_config(DistillConfig, file, ["combine.gram=modules", "combine.project_per=step"])
