import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from drivekd.data.choices import answer_letter
from drivekd.data.drivesim.camera import Renderer, Visible, default_cameras
from drivekd.data.drivesim.generate import GenerateConfig, generate, split_of_scenes
from drivekd.data.drivesim.questions import SceneContext, multiple_choice, recommended_action
from drivekd.data.drivesim.world import ACTIONS, World
from drivekd.data.formats import load_samples, load_split
from drivekd.data.validate import validate_samples

from .conftest import run_cli

SCENES = 8


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dsq") / "data"
    generate(out, GenerateConfig(scenes=SCENES, seed=3), workers=1)
    return out


@pytest.mark.integration
def test_same_seed_same_bytes_whatever_the_workers(dataset, tmp_path):
    again = tmp_path / "again"
    r = run_cli("data", "generate", "--out", str(again), "--scenes", str(SCENES), "--seed", "3", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert _digest(again) == _digest(dataset)
    other = tmp_path / "other"
    generate(other, GenerateConfig(scenes=2, seed=4))
    assert (other / "train.jsonl").read_bytes() != (dataset / "train.jsonl").read_bytes()


def test_splits_are_disjoint_by_scene(dataset):
    scenes = {split: {s.scene_id for s in load_split(dataset, split)} for split in ("train", "val", "test")}
    assert all(scenes.values())
    assert (
        not scenes["train"] & scenes["val"]
        and not scenes["train"] & scenes["test"]
        and not scenes["val"] & scenes["test"]
    )
    names = split_of_scenes(GenerateConfig(scenes=200, seed=0))
    assert names.count("test") == 20 and names.count("val") == 20


def test_dataset_is_valid_and_card_matches(dataset):
    samples = load_samples(dataset)
    report = validate_samples(samples)
    assert report.ok and report.images_referenced == 2 * SCENES
    card = json.loads((dataset / "card.json").read_text())
    for split in ("train", "val", "test"):
        split_samples = load_split(dataset, split)
        assert card["counts"][split] == {
            c: sum(s.capability == c for s in split_samples) for c in ("perception", "reasoning", "planning")
        }
    assert all(share >= 0.2 for share in card["capability_share"].values())
    for s in samples:
        assert s.question.startswith("CAM_FRONT: <image>\nCAM_BACK: <image>\n")
        assert [im.camera for im in s.images] == ["CAM_FRONT", "CAM_BACK"]
        if s.choices:
            assert answer_letter(s.answer) == s.correct_choice
        assert "Final:" in s.answer
        assert "label" in s.facts
    mc = [t for t in card["question_types"].values() if t["kind"] == "multiple_choice"]
    assert mc and all(0 < t["chance_accuracy"] < 1 for t in mc)


@pytest.mark.integration
def test_validate_cli_on_generated_folder(dataset):
    r = run_cli("data", "validate", str(dataset), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["samples"] == sum(
        json.loads((dataset / "card.json").read_text())["counts"][s][c]
        for s in ("train", "val", "test")
        for c in ("perception", "reasoning", "planning")
    )
    assert report["missing_images"] == []


def test_constructed_scene_labels_the_colliding_action_unsafe():
    # a car right beside the ego in the left lane, the road ahead free
    world = World.constructed(lanes=3, ego_lane=1, ego_speed=25.0, others=[(0, 0.0, 25.0), (2, 60.0, 25.0)])
    rollouts = {a: world.rollout(a, 3.0) for a in ACTIONS}
    assert rollouts["LANE_LEFT"].collided and rollouts["LANE_LEFT"].collided_with == 1
    assert not rollouts["IDLE"].collided and not rollouts["SLOWER"].collided
    snap = world.snapshot()
    visible = {cam.name: Renderer(cam).render(snap)[1] for cam in default_cameras(224, 128)}
    ctx = SceneContext(snap, visible, rollouts, np.random.default_rng(0))
    assert "LANE_LEFT" in ctx.collision_actions() and "LANE_LEFT" not in ctx.safe_actions()
    assert recommended_action(ctx) in ctx.safe_actions()


def test_leftmost_lane_change_left_is_unavailable():
    world = World.constructed(lanes=2, ego_lane=0, ego_speed=25.0, others=[])
    assert not world.action_available("LANE_LEFT") and world.action_available("LANE_RIGHT")


def test_projection_sanity():
    front, _ = default_cameras(224, 128)
    near = World.constructed(lanes=3, ego_lane=1, ego_speed=20.0, others=[(1, 15.0, 20.0)]).snapshot()
    far = World.constructed(lanes=3, ego_lane=1, ego_speed=20.0, others=[(1, 45.0, 20.0)]).snapshot()
    (v_near,) = Renderer(front).render(near)[1]
    (v_far,) = Renderer(front).render(far)[1]
    assert abs(v_near.cx - 0.5) < 0.03 and abs(v_far.cx - 0.5) < 0.03  # straight ahead: centre line
    assert v_far.pixels < v_near.pixels / 4  # ~1/distance^2
    horizon = front.horizon
    assert abs(v_far.cy - horizon) < abs(v_near.cy - horizon)
    # the pinhole maths: a ground point d metres ahead lands at v = horizon*H + f*h/d
    cam_pt = front.to_camera(near.ego, np.array([[near.ego.x + front.mount + 10.0, near.ego.y, 0.0]]))
    u, v = front.project(cam_pt)[0]
    assert math.isclose(u, 112.0, abs_tol=1e-6)
    assert math.isclose(v, horizon * 128 + front.focal * front.mount_height / 10.0, rel_tol=1e-9)


def test_rear_camera_sees_vehicle_behind_and_occlusion():
    _, back = default_cameras(224, 128)
    snap = World.constructed(
        lanes=3, ego_lane=1, ego_speed=20.0, others=[(1, -20.0, 20.0), (1, -40.0, 20.0)]
    ).snapshot()
    visible = Renderer(back).render(snap)[1]
    indices = [v.car.index for v in visible]
    assert 1 in indices  # the near one behind
    near = next(v for v in visible if v.car.index == 1)
    assert abs(near.cx - 0.5) < 0.03
    # the one further back, in the same lane, is partly hidden: fewer pixels than it would have alone
    alone = Renderer(back).render(
        World.constructed(lanes=3, ego_lane=1, ego_speed=20.0, others=[(1, -40.0, 20.0)]).snapshot()
    )[1]
    hidden = [v.pixels for v in visible if v.car.index == 2]
    assert not hidden or hidden[0] < alone[0].pixels


def test_multiple_choice_letters_are_near_uniform():
    rng = np.random.default_rng(0)
    letters = [multiple_choice(rng, "right", ["w1", "w2", "w3", "w4"], 4)[1] for _ in range(4000)]
    shares = [letters.count(k) / len(letters) for k in "ABCD"]
    assert max(shares) - min(shares) < 0.05


def test_correct_letters_are_dealt_evenly_within_each_split(dataset):
    for split in ("train", "val", "test"):
        letters: dict[tuple[str, int], list[str]] = {}
        for s in load_split(dataset, split):
            if s.choices:
                assert answer_letter(s.answer) == s.correct_choice and s.question.endswith(
                    " ".join(f"{k}. {v}" for k, v in s.choices.items())
                )
                letters.setdefault((s.question_type, len(s.choices)), []).append(s.correct_choice)
        assert letters
        for (_, n), got in letters.items():
            per_letter = [got.count(chr(ord("A") + i)) for i in range(n)]
            assert max(per_letter) - min(per_letter) <= 1, (split, per_letter)


def test_a_fixed_position_keeps_the_drawn_options():
    for position in range(4):
        free = multiple_choice(np.random.default_rng(5), "right", ["w1", "w2", "w3", "w4", "w5"], 4)[0]
        placed, letter = multiple_choice(
            np.random.default_rng(5), "right", ["w1", "w2", "w3", "w4", "w5"], 4, None, position
        )
        assert letter == "ABCD"[position] and placed[letter] == "right"
        assert sorted(placed.values()) == sorted(free.values())


@pytest.mark.integration
def test_contact_sheet_and_card_commands(dataset, tmp_path):
    out = tmp_path / "sheet.png"
    r = run_cli("data", "sheet", str(dataset), "--out", str(out), "--scenes", "2")
    assert r.returncode == 0, r.stderr
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[1] == 2 * 128 and im.size[0] > 2 * 224
    r = run_cli("data", "card", str(dataset))
    assert r.returncode == 0 and "| train |" in r.stdout and "majority" in r.stdout


@pytest.mark.integration
def test_generate_refuses_existing_output(dataset):
    r = run_cli("data", "generate", "--out", str(dataset), "--scenes", "1")
    assert r.returncode == 2 and "already exists" in r.stderr


def _offered_prior_accuracy(answer_counts, trials=3000, n=4):
    """Accuracy of 'pick the offered option that is most often right' on items drawn from the classes."""
    rng = np.random.default_rng(1)
    classes = list(answer_counts)
    p = np.array([answer_counts[c] for c in classes], float)
    p /= p.sum()
    hits = 0
    for _ in range(trials):
        correct = classes[rng.choice(len(classes), p=p)]
        choices, letter = multiple_choice(rng, correct, classes, n, answer_counts)
        guess = max(choices, key=lambda k: answer_counts[choices[k]])
        hits += guess == letter
    return hits / trials


def test_frequency_weighted_distractors_remove_the_offered_options_prior():
    # 10 classes, skewed like nearest_ahead: uniform distractors let "most common offered" win often.
    counts = {f"class {i}": c for i, c in enumerate([40, 30, 20, 10, 8, 6, 4, 3, 2, 1])}
    rng = np.random.default_rng(0)
    uniform_hits = 0
    for _ in range(3000):
        correct = list(counts)[rng.choice(10, p=np.array(list(counts.values())) / sum(counts.values()))]
        choices, letter = multiple_choice(rng, correct, list(counts), 4)
        uniform_hits += max(choices, key=lambda k: counts[choices[k]]) == letter
    assert uniform_hits / 3000 > 0.5
    assert _offered_prior_accuracy(counts) < 0.45  # about chance (0.25) plus the largest class's edge


def test_weighted_distractors_fill_up_with_never_correct_options():
    rng = np.random.default_rng(0)
    choices, letter = multiple_choice(rng, "a", ["a", "b", "c", "d", "e"], 4, {"a": 5, "b": 2})
    assert choices[letter] == "a" and len(choices) == 4 and "b" in choices.values()


def test_grounded_caption_names_every_visible_vehicle_once():
    from drivekd.data.drivesim.captions import scene_caption

    # ahead in the same lane (braking), ahead in the right lane, behind in the same lane
    others = [(1, 15.0, 20.0), (2, 30.0, 20.0), (1, -20.0, 20.0)]
    snap = World.constructed(lanes=3, ego_lane=1, ego_speed=20.0, others=others).snapshot()
    snap.cars = [dataclasses.replace(c, accel=-4.0) if c.index == 1 else c for c in snap.cars]
    visible = {cam.name: Renderer(cam).render(snap)[1] for cam in default_cameras(224, 128)}
    qa = scene_caption(SceneContext(snap, visible, {}, np.random.default_rng(0)))
    lines = qa.answer.splitlines()
    seen = [(cam, v) for cam, vs in visible.items() for v in vs]
    assert qa.facts["vehicles"] == len(seen) == 3
    assert lines[0] == "CAM_FRONT: 2 vehicles." and lines[3] == "CAM_BACK: 1 vehicle."
    for k, (cam, v) in enumerate(seen, start=1):
        (line,) = [ln for ln in lines if ln.startswith(v.tag(cam, k))]
        assert f"{v.car.colour} {v.car.body}" in line
    by_index = {v.car.index: ln for (cam, v), ln in zip(seen, [ln for ln in lines if ln.startswith("<c")], strict=True)}
    assert by_index[1].endswith("in the same lane, brake lights lit.")
    assert "in the right lane, no lights." in by_index[2] and "behind, in the same lane" in by_index[3]
    assert lines[-1] == "Ego lane: a middle lane of 3."


def _two_near_one_far():
    """Braking ahead in the same lane, signalling left ahead in the right lane, 60 m behind (too far)."""
    others = [(1, 15.0, 20.0), (2, 25.0, 20.0), (1, -60.0, 20.0)]
    snap = World.constructed(lanes=3, ego_lane=1, ego_speed=20.0, others=others).snapshot()
    snap.cars = [
        dataclasses.replace(c, accel=-4.0)
        if c.index == 1
        else dataclasses.replace(c, target_lane=("0", "1", 1))
        if c.index == 2
        else c
        for c in snap.cars
    ]
    visible = {cam.name: Renderer(cam).render(snap)[1] for cam in default_cameras(224, 128)}
    return snap, visible, SceneContext(snap, visible, {}, np.random.default_rng(0))


def test_object_questions_ask_colour_and_lights_of_every_vehicle_within_30_m():
    from drivekd.data.drivesim.objects import object_questions

    snap, visible, ctx = _two_near_one_far()
    assert len(ctx.tagged()) == 3
    items = object_questions(ctx)
    kinds = ["close_up_colour", "close_up_lights", "tag_colour", "tag_lights"]
    assert [q.question_type for q in items] == kinds * 2
    by_car = {v.car.index: v for v in visible["CAM_FRONT"]}
    tag1 = by_car[1].tag("CAM_FRONT", 1)
    car1 = next(c for c in snap.cars if c.index == 1)
    assert items[2].question == f"What colour is object {tag1}?" and items[3].facts["object"] == tag1
    assert [q.answer for q in items[:4]] == [f"{car1.colour.capitalize()}.", "Brake lights lit."] * 2
    assert items[0].facts["attribute"] == car1.colour and items[1].facts["status"] == "braking"
    assert items[7].answer == "Left indicator on." and items[7].facts["object"] == by_car[2].tag("CAM_FRONT", 1)
    # both questions of a vehicle share one close-up of it
    for q, car_index in ((items[0], 1), (items[4], 2)):
        cam, vehicle, context = q.close_up
        assert (cam, vehicle) == ("CAM_FRONT", car_index) and 1.0 <= context <= 2.0
        assert q.close_up == items[items.index(q) + 1].close_up
    assert items[2].close_up is None and items[3].close_up is None


def test_object_task_shows_close_ups_alone_and_tagged_questions_in_the_scene(tmp_path):
    out = tmp_path / "objects"
    card = generate(out, GenerateConfig(scenes=3, seed=5, task="objects"))
    samples = load_samples(out)
    assert validate_samples(samples).ok
    assert set(card["question_types"]) == {"close_up_colour", "close_up_lights", "tag_colour", "tag_lights"}
    for s in samples:
        if s.question_type.startswith("close_up"):
            assert [im.camera for im in s.images] == ["CLOSE_UP"]
            assert s.question.startswith("CLOSE_UP: <image>\n") and "<c" not in s.question
            with Image.open(s.images[0].path) as im:
                assert im.width == im.height >= 8
        else:
            assert [im.camera for im in s.images] == ["CAM_FRONT", "CAM_BACK"]
            assert s.facts["object"] in s.question


def test_tagged_questions_are_the_qa_colour_and_status_items_of_every_vehicle_within_30_m():
    from drivekd.data.drivesim.objects import tagged_questions
    from drivekd.data.drivesim.questions import render_options

    snap, visible, ctx = _two_near_one_far()
    items = tagged_questions(ctx)
    # neither near vehicle shows "no lights", so none is thinned: colour and status for both
    assert [q.question_type for q in items] == ["object_colour", "object_status"] * 2
    by_car = {v.car.index: v for v in visible["CAM_FRONT"]}
    car1 = next(c for c in snap.cars if c.index == 1)
    tag1, tag2 = by_car[1].tag("CAM_FRONT", 1), by_car[2].tag("CAM_FRONT", 1)
    assert [q.facts["object"] for q in items] == [tag1, tag1, tag2, tag2]
    assert items[1].facts["status"] == "braking" and items[3].facts["status"] == "left"
    colour = render_options(items[0], np.random.default_rng(1), None, position=2)
    assert colour.question.startswith(f"What colour is object {tag1}? Please select the correct answer")
    assert colour.correct_choice == "C" and len(colour.choices) == 4
    assert colour.answer.splitlines()[0] == f"Final: {{C. {car1.colour.capitalize()}.}}"
    assert colour.answer.splitlines()[1] == f"Object: {car1.colour} {car1.body}"
    status = render_options(items[3], np.random.default_rng(1), None, position=0)
    assert status.answer.startswith("Final: {A. Changing to the left lane.}")


def test_tagged_task_writes_only_qa_colour_and_status_items(tmp_path):
    out = tmp_path / "tagged"
    card = generate(out, GenerateConfig(scenes=4, seed=5, task="tagged"))
    samples = load_samples(out)
    assert validate_samples(samples).ok and samples
    assert set(card["question_types"]) <= {"object_colour", "object_status"}
    for s in samples:
        assert [im.camera for im in s.images] == ["CAM_FRONT", "CAM_BACK"]
        assert s.facts["object"] in s.question and s.choices and s.answer.startswith(f"Final: {{{s.correct_choice}.")


def test_caption_task_generates_valid_data_and_refuses_unknown_tasks(tmp_path):
    out = tmp_path / "captions"
    card = generate(out, GenerateConfig(scenes=3, seed=5, task="captions"))
    samples = load_samples(out)
    assert len(samples) == 3 == card["samples"]
    assert {s.question_type for s in samples} == {"grounded_caption"}
    assert all(s.answer.endswith(f"lane of {s.facts['lanes']}.") and s.choices is None for s in samples)
    assert validate_samples(samples).ok
    assert card["config"]["task"] == "captions"
    assert "majority_class" not in card["question_types"]["grounded_caption"]  # free text: no class
    with pytest.raises(ValueError, match="task 'vqa'"):
        GenerateConfig(scenes=1, task="vqa")


def test_warm_up_lane_check_never_reads_a_missing_lane(tmp_path):
    # scene 295 of seed 1: the warm-up driver, changing lanes away from the rightmost lane, wants to go
    # right again; the right neighbour of its current lane does not exist (was an IndexError)
    from drivekd.data.drivesim.generate import build_scene

    (tmp_path / "images").mkdir()
    draft = build_scene(295, GenerateConfig(scenes=296, seed=1, task="captions"), tmp_path / "images")
    assert len(draft.questions) == 1 and draft.questions[0].question_type == "grounded_caption"


def test_close_up_box_is_square_around_the_vehicle_and_shifted_inside_the_image():
    from drivekd.data.drivesim.objects import close_up_box

    car = World.constructed(lanes=1, ego_lane=0, ego_speed=20.0, others=[]).snapshot().ego
    mid = Visible(car, 100, cx=0.5, cy=0.5, depth=10.0, width=0.1, height=0.25)  # 22.4 x 32 px
    assert close_up_box(mid, (224, 128), 1.0) == (96, 48, 128, 80)
    assert close_up_box(mid, (224, 128), 2.0) == (80, 32, 144, 96)
    corner = Visible(car, 100, cx=0.02, cy=0.97, depth=10.0, width=0.04, height=0.05)
    assert close_up_box(corner, (224, 128), 2.0) == (0, 110, 18, 128)  # 17.9 px, shifted, not clipped
    tiny = Visible(car, 4, cx=0.5, cy=0.5, depth=60.0, width=0.005, height=0.01)
    assert close_up_box(tiny, (224, 128), 1.0) == (108, 60, 116, 68)  # at least 8 px
    huge = Visible(car, 9000, cx=0.5, cy=0.6, depth=3.0, width=0.9, height=0.9)
    assert close_up_box(huge, (224, 128), 2.0) == (48, 0, 176, 128)  # at most the image height


def test_close_up_shows_the_vehicle_without_the_one_in_front_of_it():
    from drivekd.data.drivesim.objects import close_up

    # a blue car 20 m ahead in the right lane, partly hidden behind a red one 10 m ahead in the ego lane
    snap = World.constructed(lanes=3, ego_lane=1, ego_speed=20.0, others=[(1, 10.0, 20.0), (2, 20.0, 20.0)]).snapshot()
    snap.cars = [dataclasses.replace(c, colour="red" if c.index == 1 else "blue") for c in snap.cars]
    front = default_cameras(224, 128)[0]
    _, seen = Renderer(front).render(snap)
    assert {v.car.index for v in seen} == {1, 2}

    def body_pixels(image):  # shaded red / blue paint (tail lamps are a darker red)
        r, g, b = np.asarray(image).astype(int).transpose(2, 0, 1)
        return int(((r > 140) & (g < 50) & (b < 50)).sum()), int(((b > 100) & (r < 60)).sum())

    red, blue = body_pixels(close_up(snap, front, 2, 1.5))
    assert red == 0 and blue > 200
    red, blue = body_pixels(close_up(snap, front, 1, 1.5))
    assert red > 1000 and blue == 0
    with pytest.raises(ValueError, match="vehicle 7 is not visible in CAM_FRONT"):
        close_up(snap, front, 7, 1.5)
