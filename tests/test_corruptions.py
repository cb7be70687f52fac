"""DriveBench's robustness settings (drivekd/eval/corruptions.py): every corruption is deterministic,
changes the pixels, keeps size and mode and is the kind it is named; `drivekd eval` applies them to
the pixels the model reads, and records the setting."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from drivekd.cli import main
from drivekd.data.formats import load_split
from drivekd.data.sample import IMAGE_PLACEHOLDER, ImageRef, Sample
from drivekd.errors import DataError
from drivekd.eval.corruptions import (
    CORRUPTIONS,
    DEFAULT_SEVERITY,
    GROUPS,
    InputSetting,
    corrupt_image,
    h265_available,
    image_rng,
    parse_corruption,
    shown_samples,
    without_images,
)

# drawn: their pixels depend on the sample's generator; the rest are fixed functions of the image
RANDOM = {"low_light", "fog", "snow", "rain", "water_splash", "lens_obstacle", "motion_blur", "bit_error"}
# draw whether they strike an image at all (a lost frame, a crashed camera): black when they do
STRIKE = {"camera_crash", "frame_lost"}


@pytest.fixture(scope="module")
def samples(data_dir) -> list[Sample]:
    return load_split(data_dir, "test")


@pytest.fixture(scope="module")
def frame(samples) -> Image.Image:
    with Image.open(samples[0].images[0].path) as im:
        return im.convert("RGB")


def _sample(sample_id: str, scene: str = "scene-a") -> Sample:
    return Sample(
        id=sample_id,
        capability="perception",
        question_type="q",
        images=[ImageRef("CAM_FRONT", "unused.png")],
        question=f"CAM_FRONT: {IMAGE_PLACEHOLDER}\nWhat is ahead?",
        answer="a car",
        scene_id=scene,
    )


def _corrupt(frame: Image.Image, name: str, severity: int = DEFAULT_SEVERITY, sample_id: str = "s1", seed: int = 0):
    return corrupt_image(frame, InputSetting(name, severity, seed=seed), _sample(sample_id), 0)


def _struck(frame: Image.Image, name: str, severity: int = DEFAULT_SEVERITY) -> Image.Image:
    """The first of a run of samples that the corruption strikes (a STRIKE kind spares some)."""
    for k in range(200):
        out = corrupt_image(frame, InputSetting(name, severity), _sample(f"s{k}", f"scene-{k}"), 0)
        if out.tobytes() != frame.tobytes():
            return out
    raise AssertionError(f"{name} struck none of 200 samples")


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _high_frequency(image: Image.Image) -> float:
    """Mean squared Laplacian of the grey image: what blurs remove."""
    g = np.asarray(image.convert("L"), dtype=np.float64)
    lap = -4 * g[1:-1, 1:-1] + g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]
    return float((lap**2).mean())


def test_the_registry_is_drivebenchs_fifteen_in_five_groups():
    assert list(CORRUPTIONS) == [
        "brightness", "low_light", "fog", "snow", "rain", "water_splash", "lens_obstacle", "camera_crash",
        "frame_lost", "saturate", "motion_blur", "zoom_blur", "bit_error", "color_quant", "h256_abr_compression",
    ]  # fmt: skip
    sizes = {g: sum(c.group == g for c in CORRUPTIONS.values()) for g in GROUPS}
    assert sizes == {
        "weather and lighting": 5, "external occlusion": 2, "sensor failure": 3, "motion blur": 2,
        "data transmission": 3,
    }  # fmt: skip


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("severity", [1, 5])
def test_deterministic_and_keeps_size_and_mode(frame, name, severity):
    for image in (frame, frame.convert("L")):
        first = _corrupt(image, name, severity)
        again = _corrupt(image.copy(), name, severity)
        assert first.tobytes() == again.tobytes(), "same seed, sample and image must give the same pixels"
        assert (first.size, first.mode) == (image.size, image.mode)


@pytest.mark.parametrize("name", sorted(set(CORRUPTIONS) - STRIKE))
def test_changes_the_pixels(frame, name):
    for severity in (1, 3, 5):
        assert _corrupt(frame, name, severity).tobytes() != frame.tobytes(), f"{name}:{severity} left it as it was"


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_random_kinds_draw_per_sample_and_seed(frame, name):
    base = _corrupt(frame, name, sample_id="s1").tobytes()
    assert _corrupt(frame, name, sample_id="s2").tobytes() != base
    assert _corrupt(frame, name, sample_id="s1", seed=1).tobytes() != base


def test_the_generator_is_a_stable_hash_not_pythons():
    # a fixed draw: Python's hash() is salted per process, a SHA-256 is the same on every machine and run
    rng = image_rng(InputSetting("fog", 3, seed=0), "sample:x", 0, "CAM_FRONT")
    assert rng.integers(0, 2**62) == 4265985572084553385


@pytest.mark.parametrize(("name", "rate"), [("frame_lost", 3 / 6), ("camera_crash", 1 - (5 / 6) ** 3)])
def test_lost_frames_and_crashed_cameras_are_black_at_their_rate(frame, name, rate):
    outs = [corrupt_image(frame, InputSetting(name, 3), _sample(f"s{k}", f"scene-{k}"), 0) for k in range(300)]
    struck = [o for o in outs if o.tobytes() != frame.tobytes()]
    assert all(_array(o).max() == 0 for o in struck), "a struck image is entirely black"
    assert all(o.tobytes() == frame.tobytes() for o in outs if o not in struck)
    assert abs(len(struck) / len(outs) - rate) < 0.1


def test_a_crashed_camera_stays_down_for_its_whole_scene_a_lost_frame_does_not(frame):
    def struck(name, sample_id, scene):
        out = corrupt_image(frame, InputSetting(name, 3), _sample(sample_id, scene), 0)
        return out.tobytes() != frame.tobytes()

    for scene in (f"scene-{k}" for k in range(20)):
        assert len({struck("camera_crash", f"{scene}-q{q}", scene) for q in range(6)}) == 1
    assert len({struck("frame_lost", f"q{q}", "scene-0") for q in range(40)}) == 2


def test_a_crashed_camera_is_down_whatever_the_questions_order_of_cameras(frame):
    def crashed(camera, cameras, scene):
        sample = Sample(
            id=f"{scene}-{'-'.join(cameras)}",
            capability="perception",
            question_type="q",
            images=[ImageRef(c, "unused.png") for c in cameras],
            question="\n".join(f"{c}: {IMAGE_PLACEHOLDER}" for c in cameras) + "\nWhat is ahead?",
            answer="a car",
            scene_id=scene,
        )
        out = corrupt_image(frame, InputSetting("camera_crash", 3), sample, cameras.index(camera))
        return out.tobytes() != frame.tobytes()

    for scene in (f"scene-{k}" for k in range(30)):
        assert crashed("CAM_BACK", ["CAM_FRONT", "CAM_BACK"], scene) == crashed("CAM_BACK", ["CAM_BACK"], scene)


def test_the_recorded_setting_names_the_seed_and_a_file_of_mixed_settings_is_refused(tmp_path):
    from drivekd.eval.scoring import read_predictions, render_markdown, score_file

    assert InputSetting("fog", 3).label == "fog:3" and InputSetting("fog", 3, seed=2).label == "fog:3:seed-2"
    record = {"capability": "perception", "question_type": "q", "prediction": "a car", "reference": "a car"}
    fog = tmp_path / "renamed-to-look-clean.jsonl"
    fog.write_text("".join(json.dumps({**record, "id": f"q{i}", "setting": "fog:3"}) + "\n" for i in range(2)))
    result = score_file(fog)
    assert result["setting"] == "fog:3" and "renamed-to-look-clean [fog:3]" in render_markdown([result])
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        json.dumps({**record, "id": "a", "setting": "fog:3"}) + "\n" + json.dumps({**record, "id": "b"}) + "\n"
    )
    with pytest.raises(
        DataError, match=r"mixed\.jsonl: answers under different input settings in one file \(1 clean, 1 'fog:3'\)"
    ):
        read_predictions(mixed)


def test_each_corruption_is_its_named_kind(frame):
    clean = _array(frame)
    grey_std = clean.mean(axis=2).std()

    def array(name, severity=DEFAULT_SEVERITY):
        return _array(_corrupt(frame, name, severity))

    assert array("brightness").mean() > clean.mean() + 20
    assert array("low_light").mean() < clean.mean() / 2
    assert array("low_light", 5).mean() < array("low_light", 1).mean()
    assert array("fog").mean(axis=2).std() < 0.7 * grey_std, "fog lowers contrast"
    assert array("snow").mean() > clean.mean() + 20, "snow whitens"
    assert array("rain").mean(axis=2).std() < grey_std, "rain dulls the view"

    def saturation(image):
        return np.asarray(image.convert("HSV"), dtype=np.float64)[..., 1].mean()

    assert saturation(_corrupt(frame, "saturate")) > 1.2 * saturation(frame)
    for name in ("motion_blur", "zoom_blur"):
        assert _high_frequency(_corrupt(frame, name)) < 0.7 * _high_frequency(frame), f"{name} removes detail"

    colours = len(np.unique(clean.reshape(-1, 3), axis=0))
    assert len(np.unique(array("color_quant", 5).reshape(-1, 3), axis=0)) < min(colours, 8 + 1)
    assert len(np.unique(array("color_quant").reshape(-1, 3), axis=0)) <= 2**9

    changed = np.any(array("bit_error") != clean, axis=2)
    assert 0 < changed.mean() < 0.05, "bit errors hit a few pixels"
    rows = np.flatnonzero(changed.any(axis=1))
    assert rows.max() - rows.min() > frame.height / 3, "scattered over the image, not one block"


def test_occlusions_cover_part_of_the_view(frame):
    clean = _array(frame)
    for name in ("water_splash", "lens_obstacle"):
        out = _array(_corrupt(frame, name))
        changed = np.abs(out - clean).max(axis=2) > 8
        assert 0.01 < changed.mean() < 0.6, f"{name} covers part of the view, not all of it"
    obstacle = _array(_corrupt(frame, "lens_obstacle", 5))
    covered = np.abs(obstacle - clean).max(axis=2) > 8
    assert obstacle[covered].mean() < clean[covered].mean() - 30, "the obstacle is dark"
    splash = _corrupt(frame, "water_splash", 5)
    # under the drops the view is smeared: detail is lost there
    assert _high_frequency(splash) < 0.95 * _high_frequency(frame)


def test_h265_quality_falls_with_the_bitrate(frame):
    errors = [np.abs(_array(_corrupt(frame, "h256_abr_compression", s)) - _array(frame)).mean() for s in (1, 3, 5)]
    assert errors[0] < errors[1] <= errors[2]
    label = InputSetting("h256_abr_compression", 3).label
    assert label == ("h256_abr_compression:3" if h265_available() else "h256_abr_compression:3:jpeg-stand-in")


def test_parse_corruption_names_the_bad_value_and_lists_the_valid():
    assert parse_corruption("fog") == InputSetting("fog", DEFAULT_SEVERITY)
    assert parse_corruption("snow:5", seed=4) == InputSetting("snow", 5, seed=4)
    with pytest.raises(DataError, match=r"unknown corruption 'fogg'; valid: brightness, low_light, .*h256_abr"):
        parse_corruption("fogg")
    for bad in ("fog:0", "fog:6", "fog:x", "fog:3.5"):
        with pytest.raises(DataError, match="is not an integer from 1 to 5"):
            parse_corruption(bad)


def test_text_only_drops_images_placeholders_and_camera_labels(samples):
    sample = samples[0]
    assert sample.images and IMAGE_PLACEHOLDER in sample.question
    bare = without_images(sample)
    assert bare.images == [] and IMAGE_PLACEHOLDER not in bare.question
    assert "CAM_FRONT:" not in bare.question.split("\n")[0]
    assert bare.question == sample.question.split("\n")[-1]  # the question itself, whole
    bare.check("text-only")  # as many placeholders as images: none
    inline = dataclasses.replace(sample, question=f"Look {IMAGE_PLACEHOLDER} here. {IMAGE_PLACEHOLDER}Now?")
    assert without_images(inline).question == "Look  here. Now?"


@pytest.mark.parametrize("model", ["tiny-internvl-student", "tiny-qwen25vl-student"])
def test_text_only_generates_with_both_families(samples, model):
    from drivekd.eval.predict import generate_records
    from drivekd.models.loading import load_backend

    backend = load_backend(model)
    records, _ = generate_records(
        backend, samples[:3], batch_size=3, max_new_tokens=3, setting=InputSetting(text_only=True)
    )
    assert [r["setting"] for r in records] == ["text_only"] * 3
    assert [r["question"] for r in records] == [s.question for s in samples[:3]]  # the record keeps the sample's


class _Spy:
    """A backend that records the pixels it is handed instead of running a model."""

    def __init__(self) -> None:
        self.seen: dict[str, list[bytes]] = {}

    def generate(self, batch, max_new_tokens):
        for s in batch:
            pixels = []
            for ref in s.images:
                with Image.open(ref.path) as im:
                    pixels.append(im.convert("RGB").tobytes())
            self.seen[s.id] = pixels
        return ["x"] * len(batch)


def test_the_model_reads_the_corrupted_pixels(samples, tmp_path):
    from drivekd.eval.predict import generate_records

    spy = _Spy()
    setting = InputSetting("fog", 3)
    records, _ = generate_records(spy, samples[:4], batch_size=2, setting=setting)
    for s in samples[:4]:
        for i, ref in enumerate(s.images):
            with Image.open(ref.path) as im:
                clean = im.convert("RGB")
            assert spy.seen[s.id][i] != clean.tobytes()
            assert spy.seen[s.id][i] == corrupt_image(clean, setting, s, i).tobytes()  # losslessly handed over
    assert {r["setting"] for r in records} == {"fog:3"}
    clean_records, _ = generate_records(_Spy(), samples[:2], batch_size=2)
    assert all("setting" not in r for r in clean_records)
    assert shown_samples(samples[:2], None, tmp_path) == samples[:2]


def test_eval_corruption_list_prints_every_name_and_group():
    res = CliRunner().invoke(main, ["eval", "--corruption", "list"])  # no --model, --data, --out needed
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    for c in CORRUPTIONS.values():
        (line,) = [x for x in lines if x.split()[0] == c.name]
        assert c.group in line
    if not h265_available():
        assert "STAND-IN" in res.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--corruption", "fogg"], "unknown corruption 'fogg'; valid: brightness, low_light, fog"),
        (["--corruption", "fog:9", "--model", "m", "--data", "d", "--out", "o"], "severity '9' is not an integer"),
        (["--corruption", "fog", "--text-only", "--model", "m", "--data", "d", "--out", "o"], "choose one"),
    ],
)
def test_eval_refuses_a_bad_setting_in_one_line_before_loading(args, needle):
    res = CliRunner().invoke(main, ["eval", *args])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.output


def test_eval_corruption_reaches_the_model(data_dir, tmp_path):
    """With the tiny model: fog's predictions carry the setting; the images the model read differ."""
    common = ["eval", "--model", "tiny-internvl-student", "--data", str(data_dir), "--limit", "6"]
    common += ["--max-new-tokens", "4", "--batch-size", "6"]
    out = tmp_path / "fog.jsonl"
    res = CliRunner().invoke(main, [*common, "--out", str(out), "--corruption", "fog:3"])
    assert res.exit_code == 0, res.output
    assert "setting fog:3" in res.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and {r["setting"] for r in records} == {"fog:3"}
    text = tmp_path / "text.jsonl"
    res = CliRunner().invoke(main, [*common, "--out", str(text), "--text-only"])
    assert res.exit_code == 0, res.output
    assert {json.loads(line)["setting"] for line in text.read_text().splitlines()} == {"text_only"}


def test_data_sheet_draws_every_corruption(data_dir, tmp_path):
    out = tmp_path / "sheet.png"
    res = CliRunner().invoke(
        main, ["data", "sheet", str(data_dir / "test.jsonl"), "--out", str(out), "--corruption", "all"]
    )
    assert res.exit_code == 0, res.output
    with Image.open(out) as sheet:
        with Image.open(Path(load_split(data_dir, "test")[0].images[0].path)) as im:
            w, h = im.size
        assert sheet.size == (4 * w, 4 * (h + 24))  # 16 tiles: clean and the 15
    res = CliRunner().invoke(
        main, ["data", "sheet", str(data_dir / "test.jsonl"), "--out", str(out), "--corruption", "x"]
    )
    assert res.exit_code == 2 and "unknown corruption 'x'" in res.output


# ---------------------------------------------------------------- the study's robustness table


def test_robustness_is_a_checked_profile_field_off_in_quick(tmp_path):
    from drivekd.errors import DriveKDError
    from drivekd.study.profiles import PROFILES, Robustness, load_profile

    assert PROFILES["quick"].robustness is None and "robustness" not in PROFILES["quick"].settings()
    full = PROFILES["full"].robustness
    assert full is not None and full.corruptions == tuple(CORRUPTIONS) and full.text_only
    assert list(Robustness(corruptions=("fog",), severity=2).settings()) == ["fog-2", "text_only"]
    file = tmp_path / "mine.yaml"
    file.write_text("extends: quick\nrobustness: {corruptions: [fog, rain], samples: 8}\n")
    assert load_profile(file).robustness == Robustness(corruptions=("fog", "rain"), samples=8)
    for bad, needle in (("[fgo]", "unknown corruption 'fgo' (did you mean 'fog'?)"), ("all, severity: 6", "severity")):
        file.write_text(f"extends: quick\nrobustness: {{corruptions: {bad}}}\n")
        with pytest.raises(DriveKDError, match=re.escape(needle)):
            load_profile(file)


@pytest.mark.integration  # a small study: data, its teacher's evaluations
def test_the_study_scores_the_teacher_and_first_seed_students_per_setting(tmp_path):
    from drivekd.study import runner
    from drivekd.study.profiles import Profile, Robustness
    from drivekd.study.report import _robustness_lines, robustness

    profile = Profile(
        name="tiny-robust",
        scenes=4,
        data_seed=5,
        teacher="tiny-internvl-teacher",
        student="tiny-internvl-student",
        student_epochs=0.5,
        student_lr=2e-3,
        seeds=(0, 1),
        variants=("ce",),
        eval_max_new_tokens=4,
        robustness=Robustness(corruptions=("fog", "frame_lost"), samples=5),
    )
    study = runner.Study(tmp_path / "s", profile, workers=1, echo=lambda _: None)
    study.claim()
    study.generate_data()
    robust = ["robust/clean", "robust/fog-3", "robust/frame_lost-3", "robust/text_only"]
    chains = {c.name: [step.name for step in c.steps] for c in study.plan(None)}
    assert chains["teacher"] == ["eval teacher test", "eval teacher test-other-images"] + [
        f"eval teacher {r}" for r in robust
    ]
    assert [s for s in chains["ce/seed-0"] if "robust" in s] == [f"eval ce/seed-0 {r}" for r in robust]
    assert not any("robust" in s for s in chains["ce/seed-1"]), "students: the first seed only"

    for split in ("test", *robust):
        study.evaluate_teacher(split)
    folder = tmp_path / "s" / "preds" / "teacher" / "robust"
    subset = [json.loads(x) for x in (folder / "clean.jsonl").read_text().splitlines()]
    test = load_split(tmp_path / "s" / "data", "test")
    assert len(subset) == min(5, len(test)) and {r["id"] for r in subset} <= {s.id for s in test}
    assert "setting" not in subset[0]  # the clean column: the test predictions themselves
    fog_records = [json.loads(x) for x in (folder / "fog-3.jsonl").read_text().splitlines()]
    assert [r["id"] for r in fog_records] == [r["id"] for r in subset]
    assert {r["setting"] for r in fog_records} == {"fog:3"}

    settings = json.loads((tmp_path / "s" / "study.json").read_text())["settings"]
    (row,) = robustness(tmp_path / "s", settings)  # the ce student never trained: no row
    assert row["model"] == "teacher" and row["clean"] is not None and row["text_only"] is not None
    assert row["groups"]["weather and lighting"] == {"average": row["corruptions"]["fog"], "of": 1, "named": 1}
    assert row["groups"]["external occlusion"]["named"] == 0
    table = _robustness_lines([row], settings)
    assert table[0] == "## Robustness (DriveBench's settings)"
    header = next(x for x in table if x.startswith("| model |"))
    assert header.split(" | ")[1:3] == ["clean", "weather and lighting"] and header.endswith("text-only |")
    assert any(x.startswith("| teacher | ") and x.count("–") == 3 for x in table)  # 3 groups not run
