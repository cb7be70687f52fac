"""The readers refuse what they would otherwise turn into wrong numbers without a word: wrongly typed
or empty fields, repeated JSON keys, undecodable images, scene ids that merge scenes; and they count
what they keep (exact duplicates). Each error is one line naming the file, the item and the field."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from drivekd.cli import main
from drivekd.data.contact_sheet import contact_sheet
from drivekd.data.formats import detect_format, load_samples
from drivekd.data.sample import image_blind_control, tag_fraction, unswappable, with_other_images
from drivekd.data.validate import check_images_decode, duplicate_items, validate_samples
from drivekd.errors import DataError

from .conftest import png


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def _native(**over):
    item = {
        "id": "n0",
        "capability": "perception",
        "images": [{"camera": "CAM_FRONT", "path": "a.png"}],
        "question": "<image> What is ahead?",
        "answer": "A car.",
    }
    return {**item, **over}


def _reference(question="<image>What is ahead?", answer="A car.", images=("a.png",), **over):
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "images": list(images),
        "question_type": "perception",
        **over,
    }


def _drivebench(**over):
    item = {
        "scene_token": "sc",
        "frame_token": "fr",
        "question_type": "perception",
        "question": "What is ahead?",
        "answer": "A car.",
        "tag": 2,
        "image_path": {"CAM_FRONT": "a.png"},
    }
    return {**item, **over}


def _drivelm(qa=None, paths=None, scene="scene-a", frame="f1"):
    qa = qa if qa is not None else {"perception": [{"Q": "What is ahead?", "A": "A car."}]}
    return {scene: {"key_frames": {frame: {"QA": qa, "image_paths": paths or {"CAM_FRONT": "a.png"}}}}}


def _error(path: Path, fmt=None) -> str:
    with pytest.raises(DataError) as e:
        load_samples(path, fmt)
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    return message


# -- 1. every field is type-checked where it is read -----------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("d.jsonl", _native(question={"q": 1}), "item 0 (line 1): field 'question' must be a string, got an object"),
        ("d.jsonl", _native(answer=3), "item 0 (line 1): field 'answer' must be a string, got a number"),
        ("d.jsonl", _native(id=7.5), "item 0 (line 1): field 'id' must be a string, got a number"),
        ("d.jsonl", _native(scene_id=["s"]), "field 'scene_id' must be a string, got a list"),
        ("d.jsonl", _native(question_type=True), "field 'question_type' must be a string, got a boolean"),
        ("d.jsonl", _native(capability=["plan"]), "field 'capability' must be a string, got a list"),
        ("d.jsonl", _native(facts=[1]), "field 'facts' must be an object, got a list"),
        (
            "d.jsonl",
            _native(images=[{"camera": "CAM_FRONT", "path": {"p": 1}}]),
            "item 0 (line 1) image 0: field 'path' must be a string, got an object",
        ),
        (
            "ref.json",
            [_reference(question={"q": 1})],
            "item 0: field 'messages[0].content' must be a string, got an object",
        ),
        ("ref.json", [_reference(images=[3])], "item 0: field 'images[0]' must be a string, got a number"),
        ("ref.json", [_reference(id=True)], "item 0: field 'id' must be a string, got"),
        ("db.json", [_drivebench(question={"q": 1})], "item 0: field 'question' must be a string, got an object"),
        ("db.json", [_drivebench(scene_token=12)], "item 0: field 'scene_token' must be a string, got a number"),
        ("db.json", [_drivebench(tag={"t": 0})], "item 0: field 'tag' must be a number, a string or a list"),
        (
            "db.json",
            [_drivebench(image_path={"CAM_FRONT": ["a.png"]})],
            "item 0: field \"image_path['CAM_FRONT']\" must be a string, got a list",
        ),
        (
            "lm.json",
            _drivelm(qa={"perception": [{"Q": {"q": 1}, "A": "A car."}]}),
            "scene scene-a frame f1 perception[0]: field 'Q' must be a string, got an object",
        ),
        (
            "lm.json",
            _drivelm(paths={"CAM_FRONT": 1}),
            "scene scene-a frame f1: field \"image_paths['CAM_FRONT']\" must be a string, got a number",
        ),
    ],
)
def test_wrong_type_is_an_error_naming_file_item_and_field(tmp_path, name, data, expected):
    text = json.dumps(data) + "\n" if name.endswith(".jsonl") else json.dumps(data)
    assert expected in _error(_write(tmp_path / name, text))


def test_reference_multi_turn_item_is_refused_not_cut_to_its_first_turn(tmp_path):
    item = _reference()
    item["messages"] += [{"role": "user", "content": "And behind?"}, {"role": "assistant", "content": "A bus."}]
    f = _write(tmp_path / "ref.json", [item])
    assert "item 0: 2 messages with role 'user'; only single-turn items are supported" in _error(f)


wrong_types = st.one_of(
    st.integers(-3, 3),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.integers(0, 2), max_size=2),
    st.dictionaries(st.sampled_from("ab"), st.integers(0, 2), max_size=2),
)


def _set(record, path, value):
    *parents, last = path
    for key in parents:
        record = record[key]
    record[last] = value


# (file name, a valid record of the format, where one field sits, how the message names it)
FIELDS = [
    *(("d.jsonl", _native(), (f,), repr(f)) for f in ("id", "capability", "question", "answer")),
    *(("d.jsonl", _native(scene_id="s"), (f,), repr(f)) for f in ("scene_id",)),
    ("d.jsonl", _native(), ("images", 0, "camera"), "'camera'"),
    ("d.jsonl", _native(), ("images", 0, "path"), "'path'"),
    ("ref.json", [_reference()], (0, "question_type"), "'question_type'"),
    ("ref.json", [_reference()], (0, "messages", 0, "content"), "'messages[0].content'"),
    ("ref.json", [_reference()], (0, "messages", 1, "content"), "'messages[1].content'"),
    ("ref.json", [_reference()], (0, "messages", 1, "role"), "'messages[1].role'"),
    ("ref.json", [_reference()], (0, "images", 0), "'images[0]'"),
    *(("db.json", [_drivebench()], (0, f), repr(f)) for f in ("question_type", "question", "answer", "scene_token")),
    ("db.json", [_drivebench()], (0, "frame_token"), "'frame_token'"),
    ("db.json", [_drivebench()], (0, "image_path", "CAM_FRONT"), "image_path['CAM_FRONT']"),
    ("lm.json", _drivelm(), ("scene-a", "key_frames", "f1", "QA", "perception", 0, "Q"), "'Q'"),
    ("lm.json", _drivelm(), ("scene-a", "key_frames", "f1", "QA", "perception", 0, "A"), "'A'"),
    ("lm.json", _drivelm(), ("scene-a", "key_frames", "f1", "image_paths", "CAM_FRONT"), "image_paths['CAM_FRONT']"),
]


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(FIELDS), value=wrong_types)
def test_any_text_field_of_a_wrong_type_is_named_in_the_error(tmp_path, case, value):
    name, valid, path, field = case
    record = json.loads(json.dumps(valid))
    _set(record, path, value)
    f = _write(tmp_path / name, json.dumps(record) + ("\n" if name.endswith(".jsonl") else ""))
    if path[-1] in ("id", "scene_id") and isinstance(value, int) and not isinstance(value, bool):
        (sample,) = load_samples(f)  # a whole number is an id as written, not a wrong type
        assert getattr(sample, path[-1]) == str(value)
        return
    message = _error(f)
    assert field in message and "must be a string" in message, message


# -- 2. a repeated JSON key is refused, not collapsed ------------------------------------------------


def test_a_scene_written_twice_in_drivelm_is_refused_not_collapsed(tmp_path):
    one = json.dumps(_drivelm()["scene-a"])
    two = json.dumps(_drivelm(qa={"planning": [{"Q": "What now?", "A": "Stop."}]})["scene-a"])
    f = _write(tmp_path / "lm.json", f'{{"scene-a": {one}, "scene-b": {one}, "scene-a": {two}}}')
    message = _error(f)
    assert "duplicate key 'scene-a' in the object at $;" in message and "dropped silently" in message


def test_a_repeated_key_deeper_down_is_named_with_its_path(tmp_path):
    frame = json.dumps(_drivelm()["scene-a"]["key_frames"]["f1"])
    f = _write(tmp_path / "lm.json", f'{{"scene-a": {{"key_frames": {{"f1": {frame}, "f1": {frame}}}}}}}')
    assert 'duplicate key \'f1\' in the object at $["scene-a"]["key_frames"]' in _error(f)


def test_a_repeated_key_in_a_json_lines_record_names_the_line(tmp_path):
    good = json.dumps(_native())
    f = _write(tmp_path / "d.jsonl", good + "\n" + good[:-1].replace('"id": "n0"', '"id": "n1"') + ', "answer": "B"}\n')
    assert f"{f}:2: duplicate key 'answer' in the object at $" in _error(f)


# -- 3. empty questions and answers are errors -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("d.jsonl", _native(answer="  "), "item 0 (line 1): field 'answer' is empty"),
        ("d.jsonl", _native(question=" <image> \n"), "field 'question' holds no text besides <image> placeholders"),
        ("ref.json", [_reference(answer="\n")], "item 0: field 'messages[1].content' is empty"),
        ("ref.json", [_reference(question="<image>")], "'messages[role=user].content' holds no text besides"),
        ("db.json", [_drivebench(question="")], "item 0: field 'question' is empty"),
        ("db.json", [_drivebench(answer=" ")], "item 0: field 'answer' is empty"),
        ("lm.json", _drivelm(qa={"planning": [{"Q": "What now?", "A": ""}]}), "planning[0]: field 'A' is empty"),
        ("lm.json", _drivelm(qa={"planning": [{"Q": "\t", "A": "Stop."}]}), "planning[0]: field 'Q' is empty"),
    ],
)
def test_empty_question_or_answer_is_an_error(tmp_path, name, data, expected):
    text = json.dumps(data) + "\n" if name.endswith(".jsonl") else json.dumps(data)
    assert expected in _error(_write(tmp_path / name, text))


# -- 4. exact duplicates are kept and counted ---------------------------------------------------------


def test_exact_duplicate_items_are_kept_counted_and_reported(tmp_path, capsys):
    png(tmp_path / "a.png")
    other_answer = _drivebench(answer="Two cars.")
    f = _write(tmp_path / "db.json", [_drivebench(), other_answer, _drivebench(), _drivebench()])
    samples = load_samples(f)
    assert len(samples) == 4  # kept: the sample count does not change
    assert duplicate_items(samples) == 2 and duplicate_items(samples[:2]) == 0
    warning = capsys.readouterr().err
    assert f"warning: {f}: 2 item(s) repeat an earlier item exactly (same images, question and answer); kept" in warning
    assert "first: fr:2 repeats fr:0" in warning
    report = validate_samples(samples)
    assert report.duplicate_items == 2 and report.to_json()["duplicate_items"] == 2 and report.ok
    r = _cli("data", "validate", str(f))
    assert r.exit_code == 0 and "duplicate items: 2 (exact repeats of an earlier item, kept; first: fr:2" in r.stdout
    r = _cli("data", "validate", str(f), "--strict")
    assert r.exit_code == 2 and "2 item(s) repeat an earlier item exactly" in r.stderr


def test_same_question_on_other_images_is_not_a_duplicate(tmp_path, capsys):
    f = _write(tmp_path / "db.json", [_drivebench(), _drivebench(image_path={"CAM_FRONT": "b.png"})])
    assert duplicate_items(load_samples(f)) == 0 and "repeat" not in capsys.readouterr().err


# -- 5. every image is decoded before any work ---------------------------------------------------------


def _truncated_jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.effect_noise((64, 48), 60).convert("RGB").save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_a_truncated_jpeg_fails_validation_naming_image_and_sample(tmp_path, capsys):
    png(tmp_path / "a.png")
    bad = _truncated_jpeg(tmp_path / "b.jpg")
    with Image.open(bad) as im:
        im.verify()  # the structure check alone passes it: only decoding finds the fault
    items = [
        _drivebench(),
        *(_drivebench(frame_token=f"t{k}", answer=f"{k} cars.", image_path={"CAM_FRONT": "b.jpg"}) for k in range(2)),
    ]
    f = _write(tmp_path / "db.json", items)
    samples = load_samples(f)
    ((sample_id, path, problem),) = check_images_decode(samples, progress=True)
    assert (sample_id, path) == ("t0:1", str(bad)) and problem.startswith("unreadable (OSError: image file is trunc")
    assert "decoding images" in capsys.readouterr().err  # the progress bar, on stderr
    report = validate_samples(samples)
    assert report.unreadable_images == [str(bad)] and not report.ok  # two samples, one file, decoded once
    with pytest.raises(
        DataError, match=r"db\.json: sample t0:1: image .*b\.jpg is unreadable \(OSError: image file is trunc"
    ):
        report.raise_if_bad(str(f))
    r = _cli("data", "validate", str(f))
    assert r.exit_code == 2 and "sample t0:1: image" in r.stderr and "b.jpg is unreadable" in r.stderr


# -- 6. scene ids never merge scenes; the image-blind control says what it did -----------------------


def _four_scenes(tmp_path: Path) -> Path:
    items = []
    for k in range(4):
        paths = [f"scenes/scene-{k}/{cam}/0001.jpg" for cam in ("CAM_FRONT", "CAM_BACK")]
        for p in paths:
            png(tmp_path / p, colour=(60 * k, 0, 0))
        items.append(_reference(question="<image><image>What colour is it?", answer=f"Shade {k}.", images=paths))
    return _write(tmp_path / "ref.json", items)


def test_reference_scene_ids_keep_scenes_whose_file_names_collide_apart(tmp_path):
    samples = load_samples(_four_scenes(tmp_path))
    assert [s.scene_id for s in samples] == [f"scenes/scene-{k}/0001.jpg" for k in range(4)]
    swapped = with_other_images(samples)
    assert unswappable(samples) == 0
    for before, after in zip(samples, swapped, strict=True):
        assert [im.camera for im in after.images] == [im.camera for im in before.images]
        assert {Path(im.path).parts[-3] for im in after.images} != {Path(im.path).parts[-3] for im in before.images}


def test_scene_id_is_the_frame_path_without_camera_folder(tmp_path):
    """Two questions on one frame that list its cameras in another order are one scene."""
    f = _write(
        tmp_path / "ref.json",
        [
            _reference(images=[".../samples/CAM_FRONT/x.jpg"]),
            _reference(question="<image>What is behind?", images=[".../samples/CAM_BACK/x.jpg"]),
            _reference(images=[".../samples/CAM_FRONT/y.jpg"], scene_id="given"),
        ],
    )
    assert [s.scene_id for s in load_samples(f)] == ["samples/x.jpg", "samples/x.jpg", "given"]
    native = [
        _native(id="a", images=[{"camera": "CAM_FRONT", "path": "s1/CAM_FRONT/0001.jpg"}]),
        _native(id="b", images=[{"camera": "CAM_FRONT", "path": "s2/CAM_FRONT/0001.jpg"}]),
    ]
    g = _write(tmp_path / "d.jsonl", "".join(json.dumps(x) + "\n" for x in native))
    assert [s.scene_id for s in load_samples(g)] == ["s1/0001.jpg", "s2/0001.jpg"]
    bench = [_drivebench(image_path={"CAM_FRONT": f"s{k}/CAM_FRONT/0001.jpg"}) for k in (1, 2)]
    for item in bench:
        del item["scene_token"], item["frame_token"]
    h = _write(tmp_path / "db.json", bench)
    assert [s.scene_id for s in load_samples(h)] == ["s1/0001.jpg", "s2/0001.jpg"]


def test_other_images_counts_samples_that_keep_their_own(tmp_path):
    samples = load_samples(_four_scenes(tmp_path))
    lone = load_samples(_write(tmp_path / "one.json", [_reference(images=["scenes/scene-0/CAM_FRONT/0001.jpg"])]))
    lone[0].id = "lone"
    swapped, kept_own = image_blind_control(samples + lone, source="x")
    assert kept_own == 1 and unswappable(samples + lone) == 1
    assert swapped[-1].images == lone[0].images and swapped[0].images != samples[0].images
    with pytest.raises(DataError, match="x: no sample can be shown another scene's images"):
        image_blind_control(samples[:1] + lone, source="x")
    # the first N of a split may all be one scene: the rest of the split lends its images
    (first,), kept_own = image_blind_control(samples[:1], source="x", pool=samples)
    assert kept_own == 0 and first.images == samples[1].images and first.answer == samples[0].answer


def test_eval_other_images_refuses_when_no_sample_can_be_swapped(tmp_path):
    png(tmp_path / "a.png")
    f = _write(tmp_path / "ref.json", [_reference(), _reference(question="<image>And now?")])  # one frame
    r = _cli("eval", "--model", "no-such-model", "--data", str(f), "--out", str(tmp_path / "o.jsonl"), "--other-images")
    assert r.exit_code == 2 and "no sample can be shown another scene's images" in r.stderr
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.integration
def test_eval_other_images_reports_how_many_kept_their_own(tmp_path):
    from .conftest import run_cli

    f = _four_scenes(tmp_path)
    items = [*json.loads(f.read_text()), _reference(images=["scenes/scene-0/CAM_FRONT/0001.jpg"])]
    _write(f, items)
    out = tmp_path / "o.jsonl"
    r = run_cli("eval", "--model", "tiny-internvl-student", "--data", str(f), "--out", str(out), "--other-images",
                "--max-new-tokens", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "4 of 5 samples shown another scene's images (1 kept their own" in r.stdout
    assert "warning: --other-images: 1 of 5 sample(s) keep their own images" in r.stderr


# -- 7. format detection by the records' keys ------------------------------------------------------


def test_an_empty_list_says_the_file_holds_no_samples(tmp_path):
    assert "holds no samples (an empty JSON list)" in _error(_write(tmp_path / "d.json", "[]"))
    assert "holds no samples (an empty JSON object)" in _error(_write(tmp_path / "d.json", "{}"))


def test_drivebench_records_as_json_lines_are_read_as_drivebench_whatever_the_extension(tmp_path):
    lines = "".join(json.dumps(_drivebench(frame_token=f"fr{k}")) + "\n" for k in range(2))
    for name in ("db.json", "db.jsonl"):
        f = _write(tmp_path / name, lines)
        assert detect_format(f) == "drivebench"
        samples = load_samples(f)
        assert [s.id for s in samples] == ["fr0:0", "fr1:1"] and samples[0].scene_id == "sc"
        assert samples[0].question.startswith("CAM_FRONT: <image>\n")  # read as DriveBench, not as native
    native = _write(tmp_path / "n.json", "".join(json.dumps(_native(id=f"n{k}")) + "\n" for k in range(2)))
    assert detect_format(native) == "native" and len(load_samples(native)) == 2
    as_list = _write(tmp_path / "n-list.json", [_native()])
    assert detect_format(as_list) == "native" and load_samples(as_list)[0].id == "n0"


def test_a_record_with_keys_of_two_formats_is_ambiguous(tmp_path):
    f = _write(tmp_path / "d.jsonl", json.dumps(_native(scene_token="sc")) + "\n")
    assert "record has keys of several formats (native: 'capability'; drivebench: 'scene_token')" in _error(f)
    assert len(load_samples(f, "native")) == 1  # --format settles it


# -- 8. convert refuses a missing image ---------------------------------------------------------------


def test_convert_without_copy_images_refuses_a_missing_image(tmp_path):
    f = _write(tmp_path / "db.json", [_drivebench(image_path={"CAM_FRONT": "gone.png"})])
    out = tmp_path / "out.jsonl"
    r = _cli("data", "convert", str(f), str(out))
    assert r.exit_code == 2 and "sample fr:0: image" in r.stderr and "gone.png is missing" in r.stderr
    assert not out.exists()
    r = _cli("data", "convert", str(f), str(out), "--no-image-check")
    assert r.exit_code == 0 and len(load_samples(out)) == 1


# -- 9. the contact sheet places pixel-coordinate tags ------------------------------------------------


def test_contact_sheet_draws_pixel_tags_where_they_point_and_counts_the_impossible(tmp_path):
    Image.new("RGB", (100, 50), (0, 0, 0)).save(tmp_path / "a.png")
    qa = {
        "perception": [
            {"Q": "What is <c1,CAM_FRONT,80.0,40.0>?", "A": "A car."},
            {"Q": "What is <c2,CAM_FRONT,0.2,0.2>?", "A": "A bus."},
            {"Q": "What is <c3,CAM_FRONT,1043.5,512.0>?", "A": "A van."},
        ]
    }
    samples = load_samples(_write(tmp_path / "lm.json", _drivelm(qa=qa)))
    sheet = contact_sheet(samples, scenes=1)
    magenta = (255, 0, 255)
    assert sheet.getpixel((83, 40)) == magenta  # pixels (80, 40): circle of radius 3 around it
    assert sheet.getpixel((23, 10)) == magenta  # fractions (0.2, 0.2) of 100 x 50
    bad: list[tuple[str, str]] = []
    contact_sheet(samples, scenes=1, bad_tags=bad)
    assert bad == [("f1:perception:2", "<c3,CAM_FRONT,1043.5,512.0>")]
    assert tag_fraction(1043.5, 512.0, 1600, 900) == (1043.5 / 1600, 512.0 / 900)
    assert tag_fraction(0.5, 0.25, 1600, 900) == (0.5, 0.25) and tag_fraction(1700, 10, 1600, 900) is None
    r = _cli("data", "sheet", str(tmp_path / "lm.json"), "--out", str(tmp_path / "s.png"))
    assert r.exit_code == 0 and "warning: 1 object tag(s) not drawn" in r.stderr and "f1:perception:2" in r.stderr


# -- 10. every reader maps capability aliases ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("d.jsonl", _native(capability="Prediction")),
        ("ref.json", [_reference(question_type="Prediction")]),
        ("db.json", [_drivebench(question_type="Prediction")]),
        ("lm.json", _drivelm(qa={"Prediction": [{"Q": "Will it stop?", "A": "No."}]})),
    ],
)
def test_every_reader_maps_capability_aliases(tmp_path, name, data):
    text = json.dumps(data) + "\n" if name.endswith(".jsonl") else json.dumps(data)
    (s,) = load_samples(_write(tmp_path / name, text))
    assert s.capability == "reasoning"
