"""The shipped pretrained bases: their weights are the ones their cards describe, and they still score
what the cards say on the check set (guards tokenizer, image processor and generator drift)."""

import json

import pytest

from drivekd.data.drivesim.generate import GenerateConfig, generate
from drivekd.data.formats import load_split
from drivekd.digest import sha256_of
from drivekd.distill.teachers import check_same_layout
from drivekd.models.loading import PRETRAINED, load_backend, pretrained_card, pretrained_path
from drivekd.study.bases import BASE_SEEDS, check_score, load_builds

pytestmark = pytest.mark.integration  # CLI in subprocesses, builds and studies end to end


@pytest.mark.parametrize("name", PRETRAINED)
def test_shipped_model_matches_its_card(name, tmp_path):
    card = pretrained_card(name)
    assert sha256_of(pretrained_path(name) / "model.safetensors") == card["weights_sha256"]
    assert card["name"] == name and card["rebuild"] == f"drivekd reproduce --profile {name} --out DIR"
    assert set(card["seeds"]) <= set(BASE_SEEDS)  # disjoint from every demo and test seed
    spec = card["check"]["dataset"]
    data = tmp_path / "check"
    generate(
        data,
        GenerateConfig(
            scenes=spec["scenes"], seed=spec["seed"], task=spec["task"], split_fractions=tuple(spec["split"])
        ),
    )
    got = check_score(load_backend(name), data, tmp_path / "pred.jsonl")
    assert got["items"] == card["check"]["items"]
    assert got["Avg"] >= card["check"]["Avg"] - 1e-6, (got, card["check"])


def test_cards_match_the_build_recipes():
    builds = load_builds()
    for name in PRETRAINED:
        card = pretrained_card(name)
        assert card["stages"] == json.loads(json.dumps(builds[name].stages))
        assert card["datasets"] == json.loads(json.dumps(builds[name].raw["datasets"]))


def test_teacher_and_student_base_compare_position_by_position(tmp_path):
    generate(tmp_path / "d", GenerateConfig(scenes=3, seed=5))
    samples = load_split(tmp_path / "d", "train")[:4]
    check_same_layout(load_backend(PRETRAINED[1]), load_backend(PRETRAINED[0]), samples, PRETRAINED[0])
