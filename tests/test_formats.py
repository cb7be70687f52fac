import json
from pathlib import Path

import pytest

from drivekd.data.choices import answer_letter, parse_inline_options
from drivekd.data.formats import detect_format, load_samples, write_jsonl
from drivekd.data.paths import ImageResolver
from drivekd.data.sample import normalize_capability
from drivekd.errors import DataError

from .conftest import FIXTURES, png

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
