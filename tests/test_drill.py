from pathlib import Path

import pytest

from drivekd.data.choices import permute_choices
from drivekd.data.drill import option_lookup
from drivekd.data.formats import load_split, write_jsonl
from drivekd.data.sample import ImageRef, Sample
from drivekd.eval.parsing import letter_matches_text, parse_choice

from .conftest import run_cli

CHOICES = {"A": "White.", "B": "Black.", "C": "A car ahead.", "D": "Green."}


def _mc(i: int, correct: str = "B") -> Sample:
    options = " ".join(f"{k}. {v}" for k, v in CHOICES.items())
    return Sample(
        id=f"s{i}",
        capability="perception",
        question_type="object_colour",
        images=[ImageRef("CAM_FRONT", "/nowhere/front.png")],
        question=f"CAM_FRONT: <image>\nWhat colour is object <c1,CAM_FRONT,0.5,0.5>? Please select the correct "
        f"answer from the following options: {options}",
        answer=f"Final: {{{correct}. {CHOICES[correct]}}}\nObject: black sedan",
        scene_id=f"scene-{i}",
        choices=dict(CHOICES),
        correct_choice=correct,
    )


def _open(i: int) -> Sample:
    return Sample(
        id=f"o{i}",
        capability="perception",
        question_type="count_vehicles",
        images=[ImageRef("CAM_FRONT", "/nowhere/front.png")],
        question="CAM_FRONT: <image>\nHow many vehicles are visible in CAM_FRONT?",
        answer="Final: {3}",
        scene_id=f"scene-{i}",
    )


def test_lookup_items_quote_the_right_option_and_answer_its_letter():
    items = option_lookup([_mc(0, "B"), _open(1), _mc(2, "C")])
    assert [s.id for s in items] == ["s0-lookup", "s2-lookup"]  # open-ended skipped
    first = items[0]
    assert first.images == [] and first.question.startswith('Which option says "Black."? Please select')
    assert first.answer == "Final: {B. Black.}" and first.choices == CHOICES and first.correct_choice == "B"
    first.check("drill item")  # no image placeholders, no images
    for item in items:
        assert parse_choice(item.answer, item.choices) == item.correct_choice
        assert letter_matches_text(item.answer, item.choices) is True
    # SFT re-letters options each epoch (data.shuffle_choices): the quote stays, the letter follows the text.
    moved = permute_choices(items[1], [3, 2, 1, 0])  # "A car ahead." (C) becomes B
    assert moved.correct_choice == "B" and moved.answer == "Final: {B. A car ahead.}"
    assert moved.question.startswith('Which option says "A car ahead."?')
    assert moved.question.endswith("options: A. Green. B. A car ahead. C. Black. D. White.")


@pytest.mark.integration
def test_drill_command_writes_each_split_and_refuses_bad_input(tmp_path: Path):
    src = tmp_path / "qa"
    src.mkdir()
    write_jsonl([_mc(0), _open(1), _mc(2, "A")], src / "train.jsonl")
    write_jsonl([_mc(3, "D")], src / "val.jsonl")
    out = tmp_path / "drill"
    res = run_cli("data", "drill", str(src), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "wrote 2 train, 1 val option-lookup items" in res.stdout
    assert [s.answer for s in load_split(out, "train")] == ["Final: {B. Black.}", "Final: {A. White.}"]
    assert [s.correct_choice for s in load_split(out, "val")] == ["D"]

    res = run_cli("data", "drill", str(src), "--out", str(out))
    assert (
        res.returncode == 2
        and res.stderr.strip() == f"error: {out}: already holds train.jsonl, val.jsonl; pass --overwrite"
    )
    assert run_cli("data", "drill", str(src), "--out", str(out), "--overwrite").returncode == 0

    (src / "val.jsonl").write_text('{"id": "broken"\n')  # malformed: nothing may be written
    res = run_cli("data", "drill", str(src), "--out", str(tmp_path / "half"))
    assert (
        res.returncode == 2
        and res.stderr.startswith(f"error: {src / 'val.jsonl'}:1:")
        and "malformed JSON" in res.stderr
    )
    assert not (tmp_path / "half").exists()

    only_open = tmp_path / "open.jsonl"
    write_jsonl([_open(4)], only_open)
    res = run_cli("data", "drill", str(only_open), "--out", str(tmp_path / "none"))
    assert res.returncode == 2
    assert (
        res.stderr.strip()
        == f"error: {only_open}: no multiple-choice samples (with choices and a correct letter) to drill"
    )
    assert not (tmp_path / "none").exists()
