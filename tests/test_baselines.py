from drivekd.data.sample import ImageRef, Sample
from drivekd.eval.baselines import majority_predictions
from drivekd.eval.parsing import parse_choice


def _mc(i, correct_text, options):
    letters = [chr(ord("A") + k) for k in range(len(options))]
    choices = dict(zip(letters, options, strict=True))
    letter = letters[options.index(correct_text)]
    return Sample(
        f"s{i}",
        "reasoning",
        "future",
        [ImageRef("CAM_FRONT", "x.png")],
        "<image>q",
        f"Final: {{{letter}. {correct_text}}}",
        "sc",
        choices,
        letter,
    )


def test_majority_follows_the_common_option_text_wherever_it_is():
    train = [
        _mc(0, "keep", ["keep", "left", "slow"]),
        _mc(1, "keep", ["left", "keep", "slow"]),
        _mc(2, "left", ["left", "keep", "slow"]),
    ]
    test = [_mc(3, "slow", ["slow", "left", "keep"]), _mc(4, "left", ["left", "slow", "right"])]
    preds = majority_predictions(train, test)
    assert parse_choice(preds[0], test[0].choices) == "C"  # "keep" sits at C here
    # "keep" not offered: fall back to the most common correct letter of the type (A in train)
    assert parse_choice(preds[1], test[1].choices) == "A"


def test_open_ended_majority_is_the_most_common_answer():
    def open_(i, answer):
        return Sample(f"o{i}", "planning", "safe", [], "q", answer, "sc")

    preds = majority_predictions(
        [open_(0, "Final: {IDLE}"), open_(1, "Final: {IDLE}"), open_(2, "Final: {SLOWER}")], [open_(3, "x")]
    )
    assert preds == ["Final: {IDLE}"]
