import json
from pathlib import Path

import pytest
from PIL import Image

from drivekd.data.choices import answer_letter, parse_inline_options
from drivekd.data.formats import detect_format, load_samples, write_jsonl
from drivekd.data.paths import ImageResolver
from drivekd.data.sample import normalize_capability
from drivekd.errors import DataError

from .conftest import FIXTURES, png, run_cli

REFERENCE = FIXTURES / "reference-demo.json"


def test_reference_fixture_reads_every_sample():
    samples = load_samples(REFERENCE)
    assert detect_format(REFERENCE) == "reference"
    assert [s.capability for s in samples] == ["perception"] * 2 + ["reasoning"] * 2 + ["planning"] * 3
    first = samples[0]
    assert first.choices == {"A": "Going ahead.", "B": "Turn left.", "C": "Turn right."}
    assert first.correct_choice == "A"
    assert first.answer.startswith("Final: {A. Going ahead.}")
    assert first.images[0].camera == "CAM_FRONT"
    behaviour = samples[3]
    assert behaviour.correct_choice == "C" and len(behaviour.choices) == 4
    six = samples[1]
    assert [im.camera for im in six.images] == [
        "CAM_FRONT_LEFT",
        "CAM_FRONT",
        "CAM_FRONT_RIGHT",
        "CAM_BACK_RIGHT",
        "CAM_BACK",
        "CAM_BACK_LEFT",
    ]
    assert six.question.count("<image>") == 6
    assert samples[4].choices is None  # open-ended planning question
    # no scene field: the frame's path, folders kept (never the file stem), camera folder dropped
    assert first.scene_id == "100k/train/9afb9daf-81ca742d.jpg"
    assert six.scene_id == "nuscenes/samples/n015-2018-08-03-15-00-36+0800__CAM_FRONT_LEFT__1533279665104844.jpg"
    assert len({s.scene_id for s in samples}) == len(samples)


def test_image_root_prefix_mapping(tmp_path):
    img = png(tmp_path / "bdd" / "9afb9daf-81ca742d.jpg")
    samples = load_samples(REFERENCE, image_roots=[f".../100k/train={tmp_path / 'bdd'}"])
    assert samples[0].images[0].path == str(img.resolve())
    # a plain root takes relative paths; the elided `...` component is dropped
    plain = load_samples(REFERENCE, image_roots=[str(tmp_path)])
    assert plain[0].images[0].path == str((tmp_path / "100k/train/9afb9daf-81ca742d.jpg").resolve())


def test_resolver_defaults_to_data_file_folder(tmp_path):
    resolve = ImageResolver(tmp_path / "d" / "x.jsonl")
    assert resolve("images/a.png") == str((tmp_path / "d" / "images/a.png").resolve())
    assert resolve("/abs/a.png") == "/abs/a.png"


def test_drivebench_reader(drivebench_file):
    samples = load_samples(drivebench_file)
    assert detect_format(drivebench_file) == "drivebench"
    assert [s.capability for s in samples] == ["perception", "reasoning", "reasoning", "planning"]
    assert [s.question_type for s in samples] == ["perception", "prediction", "behavior", "planning"]
    assert samples[0].correct_choice == "B"  # "B. Turn left." is B, not A
    assert samples[2].correct_choice == "A"
    assert samples[1].choices is None
    assert samples[0].question.startswith("CAM_FRONT: <image>\nCAM_BACK: <image>\n")
    assert all(Path(im.path).is_file() for s in samples for im in s.images)
    assert samples[0].scene_id == "sc1"


def test_drivelm_reader(drivelm_file):
    samples = load_samples(drivelm_file)
    assert detect_format(drivelm_file) == "drivelm"
    assert sorted(s.capability for s in samples) == ["perception", "planning", "reasoning", "reasoning"]
    assert all(len(s.images) == 2 and s.question.count("<image>") == 2 for s in samples)
    assert all(Path(im.path).is_file() for s in samples for im in s.images)


def test_convert_round_trip(drivebench_file, tmp_path):
    samples = load_samples(drivebench_file)
    out = tmp_path / "out" / "native.jsonl"
    write_jsonl(samples, out)
    back = load_samples(out)
    assert detect_format(out) == "native"
    assert [s.to_json() for s in back] == [s.to_json() for s in samples]
    line = json.loads(out.read_text().splitlines()[0])
    assert not Path(line["images"][0]["path"]).is_absolute()  # portable: relative to the file


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("Perceptual", "perception"),
        ("prediction", "reasoning"),
        ("BEHAVIOR", "reasoning"),
        ("decision", "planning"),
        ("plan", "planning"),
    ],
)
def test_capability_aliases(alias, expected):
    assert normalize_capability(alias, where="x") == expected


def test_unknown_capability_lists_accepted():
    with pytest.raises(DataError, match=r"unknown capability 'steering'; accepted: .*perception.*planning"):
        normalize_capability("steering", where="f: item 3")


def test_inline_options_and_letters():
    q = "Which? Please select the correct answer from the following options: A. Car. B. Truck. C. Bus."
    assert parse_inline_options(q) == {"A": "Car.", "B": "Truck.", "C": "Bus."}
    assert parse_inline_options("What should the ego do?") is None
    assert answer_letter("Final: {C. Bus.}") == "C"
    assert answer_letter("B. There is a car ahead.") == "B"
    assert answer_letter("Final: D. The ego ...") == "D"
    assert answer_letter("A") == "A"
    assert answer_letter("Keep going.") is None


def _drivebench_mc(tag, question, answer="C", **extra):
    return {
        "scene_token": "sc",
        "frame_token": "fr",
        "question_type": "perception",
        "question": question,
        "answer": answer,
        "image_path": {"CAM_FRONT": "a.png"},
        **({} if tag == "absent" else {"tag": tag}),
        **extra,
    }


@pytest.mark.parametrize("tag", [0, [0], "0", ["0"], 1, [2], "absent", None])
@pytest.mark.parametrize(
    "question",
    [
        "What is it doing? A. Going ahead. B. Turn left. C. Turn right.",
        "What is it doing?\nA. Going ahead.\nB. Turn left.\nC. Turn right.",
        "What is it doing? Options: A) Going ahead. B) Turn left. C) Turn right.",
    ],
    ids=["inline", "one-per-line", "parenthesis"],
)
def test_drivebench_options_become_choices_whatever_the_tag(tmp_path, tag, question):
    png(tmp_path / "a.png")
    f = tmp_path / "db.json"
    f.write_text(json.dumps([_drivebench_mc(tag, question, "C. Turn right.")]))
    (s,) = load_samples(f)
    assert s.choices == {"A": "Going ahead.", "B": "Turn left.", "C": "Turn right."}
    assert s.correct_choice == "C"


def test_drivelm_inline_options_become_choices(tmp_path):
    png(tmp_path / "x.png")
    q = "What is the status of the car <c1,CAM_FRONT,0.5,0.5>? A. Moving. B. Parked. C. Braking. D. Turning."
    data = {
        "s": {"key_frames": {"f": {"QA": {"perception": [{"Q": q, "A": "B"}]}, "image_paths": {"CAM_FRONT": "x.png"}}}}
    }
    f = tmp_path / "lm.json"
    f.write_text(json.dumps(data))
    (s,) = load_samples(f)
    assert s.choices == {"A": "Moving.", "B": "Parked.", "C": "Braking.", "D": "Turning."} and s.correct_choice == "B"


def test_native_without_choices_reads_inline_options(tmp_path):
    png(tmp_path / "a.png")
    item = {
        "id": "x",
        "capability": "perception",
        "images": [{"camera": "CAM_FRONT", "path": "a.png"}],
        "question": "<image> Which? A. Car. B. Truck.",
        "answer": "Final: {B. Truck.}",
    }
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(item) + "\n")
    (s,) = load_samples(f)
    assert s.choices == {"A": "Car.", "B": "Truck."} and s.correct_choice == "B"


@pytest.mark.integration
def test_validate_counts_multiple_choice_items_without_options(tmp_path):
    from drivekd.data.validate import validate_samples

    png(tmp_path / "a.png")
    f = tmp_path / "db.json"
    items = [
        _drivebench_mc(0, "What is it doing? A. Going ahead. B. Stopped.", "A"),
        _drivebench_mc([0], "What is the object doing?", "It is stopped."),  # marked MC, no options
        _drivebench_mc(1, "What should the ego do?", "Keep going."),
    ]
    f.write_text(json.dumps(items))
    report = validate_samples(load_samples(f))
    assert report.multiple_choice == 1 and report.mc_without_options == ["fr:1"]
    report.raise_if_bad(str(f))  # a count, not an error ...
    with pytest.raises(DataError, match=r"db.json: sample fr:1: marked multiple choice .* no 'A\. \.\.\. B\."):
        report.raise_if_bad(str(f), strict=True)  # ... unless strict
    r = run_cli("data", "validate", str(f), "--strict")
    assert r.returncode == 2 and "fr:1" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("data", "validate", str(f))
    assert r.returncode == 0 and "1 item(s) marked multiple choice have no options" in r.stderr


@pytest.mark.integration
def test_empty_data_file_fails_validation(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    r = run_cli("data", "validate", str(f))
    assert r.returncode == 2 and "empty.jsonl: no samples" in r.stderr


@pytest.mark.integration
def test_convert_copies_each_distinct_source_image_once(tmp_path):
    """Two key frames of one scene keep their own images (named by content, not scene + camera)."""
    png(tmp_path / "f1.png", colour=(200, 0, 0))
    png(tmp_path / "f2.png", colour=(0, 200, 0))
    frames = {
        fid: {"QA": {"perception": [{"Q": f"What is in {fid}?", "A": "A car."}]}, "image_paths": {"CAM_FRONT": path}}
        for fid, path in (("k1", "f1.png"), ("k2", "f2.png"))
    }
    src = tmp_path / "lm.json"
    src.write_text(json.dumps({"scene-a": {"key_frames": frames}}))
    out = tmp_path / "out" / "data.jsonl"
    r = run_cli("data", "convert", str(src), str(out), "--copy-images")
    assert r.returncode == 0, r.stderr
    converted = load_samples(out)
    copies = [Path(s.images[0].path) for s in converted]
    assert copies[0] != copies[1] and len(list((out.parent / "images").iterdir())) == 2
    assert Image.open(copies[0]).getpixel((0, 0)) == (200, 0, 0)
    assert Image.open(copies[1]).getpixel((0, 0)) == (0, 200, 0)


@pytest.mark.integration
def test_convert_refuses_a_file_that_is_not_an_image(tmp_path):
    (tmp_path / "f1.png").write_text("not an image")
    src = tmp_path / "lm.json"
    frames = {"k1": {"QA": {"perception": [{"Q": "What?", "A": "A car."}]}, "image_paths": {"CAM_FRONT": "f1.png"}}}
    src.write_text(json.dumps({"scene-a": {"key_frames": frames}}))
    r = run_cli("data", "convert", str(src), str(tmp_path / "o" / "d.jsonl"), "--copy-images")
    assert r.returncode == 2 and "k1" in r.stderr and "f1.png is unreadable" in r.stderr
    assert not (tmp_path / "o" / "images").exists() or not any((tmp_path / "o" / "images").iterdir())


def test_inline_options_end_at_their_line_and_ignore_letters_inside_sentences():
    from drivekd.data.choices import permute_choices
    from drivekd.data.sample import Sample

    q = "Which lane?\nA. Left lane.\nB. Right lane.\nAnswer with the letter and the option text."
    assert parse_inline_options(q) == {"A": "Left lane.", "B": "Right lane."}
    assert parse_inline_options("The car is at exit A. Then at exit B. Where does it go?") is None
    assert parse_inline_options("Compare object A) the car and B) the bus.") is None
    s = Sample(
        "x", "perception", "q", [], q, "Final: {B. Right lane.}", "s", {"A": "Left lane.", "B": "Right lane."}, "B"
    )
    moved = permute_choices(s, [1, 0])
    assert moved.question == "Which lane?\nA. Right lane.\nB. Left lane.\nAnswer with the letter and the option text."
    assert moved.answer == "Final: {A. Right lane.}" and moved.correct_choice == "A"
    assert answer_letter("Answer: B") == "B" and answer_letter("The answer is C.") == "C"
    assert answer_letter("the answer is a car") is None


def test_validate_counts_options_without_a_correct_letter(tmp_path):
    from drivekd.data.validate import validate_samples

    png(tmp_path / "a.png")
    f = tmp_path / "db.json"
    f.write_text(json.dumps([_drivebench_mc(0, "What is it doing? A. Going ahead. B. Stopped.", "It moves.")]))
    report = validate_samples(load_samples(f))
    assert report.mc_without_letter == ["fr:0"]
    with pytest.raises(DataError, match="has options but its answer names none of their letters"):
        report.raise_if_bad(str(f), strict=True)
