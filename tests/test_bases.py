"""`drivekd reproduce --profile <base>`: a base build at tiny size, its card, its resumption."""

import json
from pathlib import Path

import pytest
import yaml

from drivekd.digest import sha256_of
from drivekd.errors import DriveKDError
from drivekd.study.bases import BaseBuilder, install, load_builds

pytestmark = pytest.mark.integration  # CLI in subprocesses, builds and studies end to end

TINY_BUILD = {
    "tiny-base": {
        "preset": "tiny-internvl-student",
        "about": "A test build.",
        "datasets": {
            "qa": {"task": "qa", "scenes": 3, "seed": 150},
            "objects": {"task": "objects", "scenes": 3, "seed": 151},
            "lookup": {"drill": "qa"},
            "heldout": {"task": "qa", "scenes": 4, "seed": 152, "split": [0.5, 0.0, 0.5]},
        },
        "stages": {
            "drill": {
                "model": {"name": "tiny-internvl-student"},
                "data": {"path": "@lookup", "max_length": 512},
                "train": {"max_steps": 2, "save_every": 1},
            },
            "joint": {
                "model": {"name": "@drill"},
                "data": {"path": "@qa", "max_length": 512, "mix": [{"path": "@objects", "samples": 4}]},
                "tag_attention": {"weight": 1.0},
                "train": {"max_steps": 2},
            },
        },
        "evaluate": "heldout",
        "check": "heldout",
        "export_dtype": "float16",
    }
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    spec = root / "bases.yaml"
    spec.write_text(yaml.safe_dump(TINY_BUILD, sort_keys=False))
    build = load_builds(spec)["tiny-base"]
    out = root / "build"
    export = BaseBuilder(build, out, workers=1, echo=lambda _: None).run()
    return build, out, export


def test_build_exports_weights_with_a_card(built):
    _, out, export = built
    card = json.loads((export / "card.json").read_text())
    assert card["weights_sha256"] == sha256_of(export / "model.safetensors")
    assert card["seeds"] == [150, 151, 152] and card["steps"] == 4
    assert card["rebuild"] == "drivekd reproduce --profile tiny-base --out DIR"
    assert card["heldout"]["items"] == card["check"]["items"] > 0
    for key in ("model", "other_images", "majority"):
        assert 0.0 <= card["scores"][key]["Avg"] <= 100.0 and card["scores"][key]["types"]
    # the second stage started from the first one's final weights and used the dataset folders
    joint = yaml.safe_load((out / "stages" / "joint" / "config.yaml").read_text())
    assert joint["model"]["name"] == str(out / "stages" / "drill" / "final")
    assert joint["data"]["mix"][0]["path"] == str(out / "data" / "objects")


def test_a_finished_build_is_not_redone_and_another_spec_is_refused(built, monkeypatch):
    build, out, export = built
    monkeypatch.setattr(BaseBuilder, "run_stage", lambda *a: pytest.fail("a finished stage ran again"))
    monkeypatch.setattr(BaseBuilder, "make_dataset", lambda *a: pytest.fail("a finished dataset ran again"))
    assert BaseBuilder(build, out, echo=lambda _: None).run() == export
    changed = type(build)(**{**build.__dict__, "raw": {**build.raw, "about": "changed"}})
    with pytest.raises(DriveKDError, match="holds a build with other settings"):
        BaseBuilder(changed, out, echo=lambda _: None).run()


def test_install_checks_the_hash(built, tmp_path):
    _, _, export = built
    target = install(export, tmp_path / "pretrained")
    assert (target / "model.safetensors").read_bytes() == (export / "model.safetensors").read_bytes()
    (tmp_path / "bad").mkdir()
    for f in export.iterdir():
        (tmp_path / "bad" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(DriveKDError, match="does not match its card's hash"):
        install(tmp_path / "bad", tmp_path / "pretrained")


def test_shipped_build_specs_are_valid():
    builds = load_builds()
    assert set(builds) == {"drivesim-internvl-teacher", "drivesim-internvl-student-base"}
    for build in builds.values():
        assert {d.seed for d in build.datasets.values() if d.drill is None} <= set(range(100, 300))
        for name in build.stages:
            BaseBuilder(build, Path("/nonexistent")).stage_config(name)  # validates as an SFT config


def test_a_variant_is_laid_over_the_spec(tmp_path):
    spec = {
        "tiny-base": {
            **TINY_BUILD["tiny-base"],
            "variants": {
                "fast": {
                    "datasets": {"qa": {"scenes": 2}},
                    "stages": {"joint": {"train": {"max_steps": 5}, "data": {"mix": []}}},
                }
            },
        }
    }
    file = tmp_path / "bases.yaml"
    file.write_text(yaml.safe_dump(spec, sort_keys=False))
    plain, fast = load_builds(file)["tiny-base"], load_builds(file, variant="fast")["tiny-base"]
    assert plain.variant is None and "variants" not in plain.raw
    assert (
        fast.variant == "fast"
        and fast.rebuild_command == "drivekd reproduce --profile tiny-base --variant fast --out DIR"
    )
    assert fast.datasets["qa"].scenes == 2 and fast.datasets["qa"].seed == 150  # merged, not replaced
    joint = fast.stages["joint"]
    assert joint["train"] == {"max_steps": 5} and joint["tag_attention"] == {"weight": 1.0}
    assert joint["data"]["mix"] == []
    assert joint["data"]["path"] == "@qa"
    assert fast.stages["drill"] == plain.stages["drill"]
    with pytest.raises(DriveKDError, match="no build has a variant 'slow'"):
        load_builds(file, variant="slow")


def test_shipped_variants_validate():
    for variant in ("gpu", "smoke"):
        builds = load_builds(variant=variant)
        assert set(builds) == {"drivesim-internvl-teacher", "drivesim-internvl-student-base"}
        for build in builds.values():
            for name in build.stages:
                BaseBuilder(build, Path("/nonexistent")).stage_config(name)


def test_a_dataset_is_reused_only_when_its_card_matches(built, tmp_path):
    from drivekd.data.drivesim.generate import GenerateConfig
    from drivekd.study.bases import find_dataset

    _, out, _ = built
    same = GenerateConfig(scenes=3, seed=150, task="qa")
    assert find_dataset(out / "data", same) == out / "data" / "qa"
    assert find_dataset(out / "data", GenerateConfig(scenes=4, seed=150, task="qa")) is None
    assert find_dataset(out / "data", GenerateConfig(scenes=3, seed=150, task="captions")) is None
    copy = tmp_path / "copy" / "qa"
    copy.mkdir(parents=True)
    card = json.loads((out / "data" / "qa" / "card.json").read_text())
    for f in ("train.jsonl", "val.jsonl", "test.jsonl"):
        (copy / f).write_text((out / "data" / "qa" / f).read_text())
    (copy / "card.json").write_text(json.dumps({**card, "generator_version": "drivesim-qa/0"}))
    assert find_dataset(tmp_path / "copy", same) is None  # another generator wrote other bytes


def test_verify_base_refuses_a_folder_without_an_export(tmp_path):
    from .conftest import run_cli

    (tmp_path / "empty").mkdir()
    r = run_cli("models", "verify-base", str(tmp_path / "empty"), "--work", str(tmp_path / "w"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "no card.json: not a finished base build's export" in r.stderr
    assert not (tmp_path / "w").exists()  # found before any work starts


def test_a_name_that_is_both_a_dataset_and_a_stage_is_refused(tmp_path):
    # '@qa' would silently resolve to the dataset where a stage's model was meant
    spec = json.loads(json.dumps(TINY_BUILD))
    spec["tiny-base"]["stages"]["qa"] = {"model": {"name": "@joint"}, "data": {"path": "@qa"}}
    path = tmp_path / "bases.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(DriveKDError, match="'qa' names both a dataset and a stage"):
        load_builds(path)


def test_a_stage_is_checked_when_the_build_file_is_read(tmp_path):
    spec = yaml.safe_load(yaml.safe_dump(TINY_BUILD))
    file = tmp_path / "bases.yaml"
    spec["tiny-base"]["stages"]["drill"]["train"]["lr"] = -1.0
    file.write_text(yaml.safe_dump(spec))
    with pytest.raises(
        DriveKDError, match=r"bases.yaml: tiny-base: stage drill: train.lr: Input should be greater than 0"
    ):
        load_builds(file)
    spec["tiny-base"]["stages"]["drill"]["train"] = {"max_steps": 2, "tag_attention_weight": 1.0}
    file.write_text(yaml.safe_dump(spec))
    with pytest.raises(DriveKDError, match=r"stage drill: `train.tag_attention_weight` moved to an experimental"):
        load_builds(file)
