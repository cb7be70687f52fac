"""Property tests: whatever a user's file holds, readers and the scorer give samples, a score or a
one-line DataError, never another exception (which the CLI would show as a traceback)."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivekd.data.formats import load_samples
from drivekd.errors import DataError
from drivekd.eval.parsing import parse_choice
from drivekd.eval.scoring import score_file

SETTINGS = settings(
    max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=12))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
)
capabilities = st.sampled_from(["perception", "prediction", "behavior", "planning", "steering", 3, None])
texts = st.one_of(st.text(max_size=40), st.just("Q? A. Going ahead. B. Turn left."), st.just("Final: {B. Turn left.}"))


def _maybe(value_strategy):
    """A field that is usually well-typed, sometimes of a wrong type, sometimes missing."""
    return st.one_of(value_strategy, json_values, st.just(...))


def _item(fields: dict) -> st.SearchStrategy:
    return st.fixed_dictionaries({k: _maybe(v) for k, v in fields.items()}).map(
        lambda d: {k: v for k, v in d.items() if v is not ...}
    )


drivebench_items = _item(
    {
        "scene_token": st.text(max_size=4),
        "frame_token": st.text(max_size=4),
        "question_type": capabilities,
        "question": texts,
        "answer": texts,
        "tag": st.one_of(st.integers(0, 3), st.lists(st.integers(0, 3), max_size=2), st.just("0")),
        "image_path": st.dictionaries(st.sampled_from(["CAM_FRONT", "CAM_BACK"]), st.text(max_size=6), max_size=2),
    }
)
native_items = _item(
    {
        "id": st.text(max_size=4),
        "capability": capabilities,
        "images": st.lists(_item({"camera": st.text(max_size=4), "path": st.text(max_size=6)}), max_size=2),
        "question": texts,
        "answer": texts,
        "choices": st.dictionaries(st.sampled_from("ABCD"), st.text(max_size=6), max_size=3),
        "correct_choice": st.sampled_from(["A", "B", "Z", 1]),
    }
)
reference_items = _item(
    {
        "messages": st.lists(_item({"role": st.sampled_from(["user", "assistant"]), "content": texts}), max_size=3),
        "images": st.lists(st.text(max_size=6), max_size=2),
        "question_type": capabilities,
    }
)
drivelm_files = st.dictionaries(
    st.text(max_size=4),
    _item(
        {
            "key_frames": st.dictionaries(
                st.text(max_size=4),
                _item(
                    {
                        "QA": st.dictionaries(
                            capabilities.filter(lambda c: isinstance(c, str)),
                            st.lists(_item({"Q": texts, "A": texts}), max_size=2),
                            max_size=2,
                        ),
                        "image_paths": st.dictionaries(st.sampled_from(["CAM_FRONT"]), st.text(max_size=6), max_size=1),
                    }
                ),
                max_size=2,
            )
        }
    ),
    max_size=2,
)


def _load(tmp_path, name, text, fmt):
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    try:
        samples = load_samples(f, fmt)
    except DataError as e:
        assert "\n" not in str(e).strip() and str(f) in str(e)
        return None
    for s in samples:
        s.check("x")  # what a reader returns is consistent
    return samples


@SETTINGS
@given(items=st.one_of(st.lists(drivebench_items, max_size=3), json_values))
def test_drivebench_reader_never_crashes(tmp_path, items):
    _load(tmp_path, "db.json", json.dumps(items), "drivebench")


@SETTINGS
@given(items=st.one_of(st.lists(reference_items, max_size=3), json_values))
def test_reference_reader_never_crashes(tmp_path, items):
    _load(tmp_path, "ref.json", json.dumps(items), "reference")


@SETTINGS
@given(data=st.one_of(drivelm_files, json_values))
def test_drivelm_reader_never_crashes(tmp_path, data):
    _load(tmp_path, "lm.json", json.dumps(data), "drivelm")


@SETTINGS
@given(items=st.lists(st.one_of(native_items, json_values), max_size=3), cut=st.integers(0, 400))
def test_native_reader_never_crashes_even_on_truncated_files(tmp_path, items, cut):
    text = "".join(json.dumps(i) + "\n" for i in items)
    _load(tmp_path, "d.jsonl", text[: cut or None], None)


prediction_lines = _item(
    {
        "id": st.one_of(st.text(max_size=3), st.integers(0, 3)),
        "capability": capabilities,
        "question_type": st.text(max_size=5),
        "prediction": texts,
        "reference": texts,
        "choices": st.dictionaries(st.sampled_from("ABCD"), st.text(max_size=6), max_size=3),
        "correct_choice": st.sampled_from(["A", "B", "Z", None]),
        "facts": st.dictionaries(
            st.sampled_from(["count", "action", "lane", "safe_actions", "attribute"]), json_values, max_size=2
        ),
    }
)


@SETTINGS
@given(lines=st.lists(st.one_of(prediction_lines, json_values), max_size=4), cut=st.integers(0, 500))
def test_scorer_gives_a_score_or_one_line_error(tmp_path, lines, cut):
    f = tmp_path / "p.jsonl"
    text = "".join(json.dumps(x) + "\n" for x in lines)
    f.write_text(text[: cut or None], encoding="utf-8")
    try:
        result = score_file(f)
    except DataError as e:
        assert "\n" not in str(e).strip() and str(f) in str(e)
        return
    assert result["average"] is None or 0.0 <= result["average"] <= 100.0


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.text(max_size=80), choices=st.dictionaries(st.sampled_from("ABCDEF"), st.text(max_size=12), max_size=5))
def test_parse_choice_returns_an_offered_letter_or_none(text, choices):
    got = parse_choice(text, choices)
    assert got is None or got in choices


@pytest.mark.parametrize("bad", ["", "   \n", "[", "{}", "null"])
def test_degenerate_files_are_data_errors(tmp_path, bad):
    assert _load(tmp_path, "x.json", bad, None) is None or bad.strip() == ""
