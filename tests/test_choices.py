import pytest

from drivekd.data.choices import parse_inline_options, permute_choices, shuffle_choices
from drivekd.data.sample import ImageRef, Sample


def _sample(question_tail="", answer="Final: {B. Turn left.}\nObject: black sedan"):
    q = (
        "CAM_FRONT: <image>\nWhat is the moving status of object <c1,CAM_FRONT,0.5,0.4>? Please select the "
        "correct answer from the following options: A. Going ahead. B. Turn left. C. Turn right." + question_tail
    )
    return Sample(
        id="s1",
        capability="perception",
        question_type="object_status",
        images=[ImageRef("CAM_FRONT", "/x.png")],
        scene_id="scene-1",
        question=q,
        answer=answer,
        choices={"A": "Going ahead.", "B": "Turn left.", "C": "Turn right."},
        correct_choice="B",
    )


def test_permutation_reletters_question_answer_and_choices_consistently():
    s = _sample()
    t = permute_choices(s, [1, 2, 0])  # new A = old B, new B = old C, new C = old A
    assert t.choices == {"A": "Turn left.", "B": "Turn right.", "C": "Going ahead."}
    assert t.correct_choice == "A"
    assert t.answer == "Final: {A. Turn left.}\nObject: black sedan"
    assert parse_inline_options(t.question) == t.choices
    assert t.question.split("options:")[0] == s.question.split("options:")[0]
    assert s.correct_choice == "B" and s.choices["B"] == "Turn left."  # the original is untouched


@pytest.mark.parametrize(
    "sample",
    [
        _sample(question_tail=" Answer briefly."),  # text after the options: cannot rebuild the question
        _sample(answer="Final: {C. Turn right.}"),  # answer disagrees with correct_choice
        _sample(answer="The car turns left."),  # no committed letter
    ],
)
def test_inconsistent_samples_are_left_alone(sample):
    assert permute_choices(sample, [2, 0, 1]) is sample


def test_shuffle_is_a_function_of_its_key_and_covers_every_letter():
    s = _sample()
    assert shuffle_choices(s, (0, 1, 7)) == shuffle_choices(s, (0, 1, 7))
    letters = {shuffle_choices(s, (0, epoch, 7)).correct_choice for epoch in range(30)}
    assert letters == {"A", "B", "C"}
    for epoch in range(30):
        t = shuffle_choices(s, (0, epoch, 7))
        assert t.choices[t.correct_choice] == "Turn left." and f"{{{t.correct_choice}. Turn left.}}" in t.answer
