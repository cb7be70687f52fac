"""Scoring and evaluation refuse what would give silent wrong numbers: partial Avgs are marked,
empty or malformed prediction files and unknown splits are one-line errors, question-type spellings
are one row."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from drivekd.cli import main
from drivekd.data.sample import ImageRef, Sample
from drivekd.errors import DataError
from drivekd.eval.baselines import majority_predictions
from drivekd.eval.parsing import parse_choice
from drivekd.eval.scoring import (
    ItemScore,
    average_over,
    normalize_question_type,
    render_markdown,
    score_file,
    summarize,
)

from .conftest import png

CHOICES = {"A": "Going ahead.", "B": "Turn left.", "C": "Turn right.", "D": "Braking."}


def _line(i, cap, qt, pred, ref, **extra):
    return json.dumps(
        {"id": f"s{i}", "capability": cap, "question_type": qt, "prediction": pred, "reference": ref, **extra}
    )


def _mc(i, cap, qt, pred, correct):
    return _line(i, cap, qt, pred, f"Final: {{{correct}. {CHOICES[correct]}}}", choices=CHOICES, correct_choice=correct)


def _write(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- 1. an Avg over fewer capabilities


@pytest.fixture
def full_and_partial(tmp_path):
    full = _write(
        tmp_path / "full.jsonl",
        [
            _mc(1, "perception", "status", "A", "A"),  # perception 100
            _mc(2, "reasoning", "behavior", "B", "A"),  # reasoning 0
            _mc(3, "planning", "plan", "C", "C"),  # planning 100
        ],
    )
    partial = _write(
        tmp_path / "partial.jsonl",
        [_mc(1, "perception", "status", "A", "A"), _mc(2, "reasoning", "behavior", "A", "A")],  # no planning
    )
    return full, partial


def test_partial_average_names_its_capabilities(full_and_partial):
    full, partial = (score_file(f) for f in full_and_partial)
    assert full["average"] == pytest.approx(200 / 3, abs=1e-3)
    assert full["average_over"] == ["perception", "reasoning", "planning"]
    assert partial["average"] == 100.0 and partial["average_over"] == ["perception", "reasoning"]
    assert average_over({"perception": 0.0, "reasoning": None, "planning": 5.0}) == ["perception", "planning"]


def test_partial_average_is_marked_in_the_table_with_a_footnote(full_and_partial):
    table = render_markdown([score_file(f) for f in full_and_partial]).splitlines()
    assert "| **Avg** | 66.67 | 100.00* |" in table
    assert table[-2] == ""  # the footnote follows the table after a blank line
    assert table[-1] == (
        "Avg* is the mean of fewer than the 3 capabilities, not comparable with an Avg of all 3: "
        "partial has no planning."
    )
    # all three present: no mark, no footnote
    alone = render_markdown([score_file(full_and_partial[0])]).splitlines()
    assert "| **Avg** | 66.67 |" in alone and not any(line.startswith("Avg*") for line in alone)
    assert alone[-1].startswith("| MC letter names")


def test_partial_judge_average_is_marked():
    result = summarize("m.jsonl", [ItemScore("a", "perception", "q", 100.0, "language")])
    result["judge"] = {
        "capabilities": {"perception": 80.0, "reasoning": None, "planning": 90.0},
        "average": 85.0,
        "failed": 1,
    }
    lines = render_markdown([result]).splitlines()
    assert "| **Avg** | 100.00* |" in lines and "| Judge avg | 85.00* |" in lines
    assert lines[-1].startswith("Judge avg* is the mean of fewer than the 3 capabilities")
    assert lines[-1].endswith(": m has no judged reasoning.")
    assert lines[-2].endswith(": m has no reasoning, planning.")


def test_cli_json_says_what_the_average_is_over(full_and_partial):
    res = CliRunner().invoke(main, ["score", *map(str, full_and_partial), "--json"])
    assert res.exit_code == 0, res.output
    objs = [json.loads(line) for line in res.output.splitlines()]
    assert [o["average_over"] for o in objs] == [["perception", "reasoning", "planning"], ["perception", "reasoning"]]
    res = CliRunner().invoke(main, ["score", *map(str, full_and_partial)])
    assert "| **Avg** | 66.67 | 100.00* |" in res.output and "partial has no planning." in res.output


# ---------------------------------------------------------------- 2. degenerate prediction files


@pytest.mark.parametrize("content", ["", "\n\n", "   \n\t\n"])
def test_empty_prediction_file_is_refused(tmp_path, content):
    f = tmp_path / "empty.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match="no predictions") as e:
        score_file(f)
    assert str(f) in str(e.value)
    line = _one_line_error(CliRunner().invoke(main, ["score", str(f)]), str(f), "no predictions")
    assert line == f"error: {f}: no predictions (the file is empty); expected one JSON object per line"


def test_an_empty_file_among_good_ones_fails_the_run(full_and_partial, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _one_line_error(CliRunner().invoke(main, ["score", str(full_and_partial[0]), str(empty)]), str(empty))


@pytest.mark.parametrize(
    ("lines", "needles"),
    [
        ([_line(1, "planning", "q", "a", "b"), "not json at all"], [":2:1: malformed JSON"]),
        ([_line(1, "planning", "q", "a", "b"), '{"id": 2, "capability": '], [":2:", "malformed JSON"]),
        ([json.dumps({"id": 1, "capability": "planning", "question_type": "q", "reference": "r"})],
         [":1:", "missing required field 'prediction'"]),
        ([json.dumps({"id": 1, "question_type": "q", "prediction": "p", "reference": "r"})],
         [":1:", "missing required field 'capability'"]),
        ([_line(1, None, "q", "a", "b")], [":1:", "field 'capability' must be a string, got NoneType"]),
        ([_line(1, ["planning"], "q", "a", "b")], [":1:", "field 'capability' must be a string, got list"]),
        ([_line(1, "planning", "", "a", "b")], [":1:", "field 'question_type' is empty"]),
        ([_line(1, "planning", " - _ ", "a", "b")], [":1:", "field 'question_type' is empty"]),
        ([_line(1, "planning", None, "a", "b")], [":1:", "field 'question_type' must be a string"]),
        (['"just a string"'], [":1:", "expected a JSON object, got str"]),
    ],
)  # fmt: skip
def test_degenerate_prediction_lines_name_file_line_and_problem(tmp_path, lines, needles):
    f = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as e:
        score_file(f)
    for needle in [str(f), *needles]:
        assert needle in str(e.value)
    _one_line_error(CliRunner().invoke(main, ["score", str(f)]), str(f), *needles)


def test_a_byte_order_mark_is_not_a_json_error(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(("\ufeff" + _mc(1, "perception", "status", "A", "A") + "\n").encode("utf-8"))
    assert score_file(f)["capabilities"]["perception"] == 100.0


# ---------------------------------------------------------------- 3. --split honoured or refused


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A native dataset folder (train and test, no val) and the same samples as one data file."""
    root = tmp_path / "ds"
    png(root / "a.png")
    rows = [
        {
            "id": f"s{i}",
            "capability": ["perception", "reasoning"][i % 2],
            "question_type": "q",
            "images": [{"camera": "CAM_FRONT", "path": "a.png"}],
            "question": f"<image>Which way, {i}?",
            "answer": ["keep", "stop"][i % 3 == 0],
            "scene_id": f"sc{i}",
        }
        for i in range(6)
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    (root / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _eval(*args):
    return CliRunner().invoke(main, ["eval", "--model", "/nonexistent/model", "--out", "unused.jsonl", *args])


def test_eval_refuses_a_split_on_a_data_file(dataset):
    file = dataset / "all.jsonl"
    for split in ("test", "nonsense"):
        _one_line_error(
            _eval("--data", str(file), "--split", split),
            str(file),
            f"a data file has no splits, so --split {split} cannot be honoured",
            f"drivekd data split {file} DIR",
        )


def test_eval_refuses_a_split_the_folder_lacks_and_lists_the_splits(dataset):
    _one_line_error(
        _eval("--data", str(dataset), "--split", "nonsense"),
        str(dataset),
        "no split 'nonsense' (nonsense.jsonl)",
        "splits found: all, test, train",
    )
    _one_line_error(_eval("--data", str(dataset), "--split", "val"), "no split 'val'")


def test_eval_reads_the_whole_file_without_split_and_says_so(dataset):
    from drivekd.cli.evaluate import eval_samples

    samples, what = eval_samples(dataset / "all.jsonl", None)
    assert len(samples) == 6 and what == "the whole file: a data file has no splits"
    samples, what = eval_samples(dataset, None)  # a folder: test by default
    assert [s.id for s in samples] == ["s4", "s5"] and what == "split 'test'"
    res = _eval("--data", str(dataset / "all.jsonl"))  # gets as far as loading the model
    assert "note: predicting 6 samples from the whole file: a data file has no splits" in res.output
    assert "/nonexistent/model" in res.output and res.exit_code == 2


def test_eval_with_no_sample_left_names_the_filter(dataset):
    _one_line_error(
        _eval("--data", str(dataset), "--capability", "planning"),
        f"{dataset} (split 'test', capability planning): no samples",
    )


def test_baseline_on_a_data_file_says_a_file_has_no_splits(dataset, tmp_path):
    file = dataset / "all.jsonl"
    res = CliRunner().invoke(main, ["baseline", "--data", str(file), "--out", str(tmp_path / "b.jsonl")])
    line = _one_line_error(res, str(file), "a data file has no splits", f"drivekd data split {file} DIR")
    assert "dataset folder" not in line.split("split it first")[0] and "no test.jsonl" not in line
    assert not (tmp_path / "b.jsonl").exists()


def test_baseline_splits_must_exist_and_differ(dataset, tmp_path):
    out = str(tmp_path / "b.jsonl")
    res = CliRunner().invoke(main, ["baseline", "--data", str(dataset), "--split", "val", "--out", out])
    _one_line_error(res, "no split 'val'", "splits found: all, test, train")
    res = CliRunner().invoke(main, ["baseline", "--data", str(dataset), "--train-split", "dev", "--out", out])
    _one_line_error(res, "no split 'dev'")
    res = CliRunner().invoke(main, ["baseline", "--data", str(dataset), "--split", "train", "--out", out])
    _one_line_error(res, "--split and --train-split are both 'train'")
    res = CliRunner().invoke(main, ["baseline", "--data", str(dataset), "--out", out])
    assert res.exit_code == 0, res.output
    assert [json.loads(x)["id"] for x in Path(out).read_text().splitlines()] == ["s4", "s5"]


# ---------------------------------------------------------------- 4. one key per question type


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("object_status", "object_status"),
        ("Object Status", "object_status"),
        ("object-status", "object_status"),
        ("  OBJECT__status ", "object_status"),
        ("Object - Status", "object_status"),
        ("Behaviour", "behavior"),
        ("behavior", "behavior"),
        ("Perceptual", "perception"),
        ("predict", "prediction"),
        ("Plan", "planning"),
    ],
)
def test_normalize_question_type(name, key):
    assert normalize_question_type(name) == key
    assert normalize_question_type(key) == key  # idempotent


def test_question_type_spellings_are_one_row(tmp_path):
    f = _write(
        tmp_path / "m.jsonl",
        [
            _mc(1, "perception", "object_status", "A", "A"),
            _mc(2, "perception", "Object Status", "B", "A"),
            _mc(3, "perception", "object-status", "A", "A"),
            _mc(4, "perception", " OBJECT_STATUS ", "A", "A"),
            _mc(5, "Behaviour", "behavior", "A", "A"),  # DriveBench: capability and type named alike
            _mc(6, "reasoning", "Behaviour", "B", "A"),
        ],
    )
    r = score_file(f)
    assert set(r["by_question_type"]) == {"object_status", "behavior"}
    assert r["by_question_type"]["object_status"]["samples"] == 4
    assert r["by_question_type"]["object_status"]["score"] == 75.0
    assert r["by_question_type"]["object_status"]["letters"]["top_letter_share"] == 75.0  # one group, not four
    assert r["by_question_type"]["behavior"] == {
        "capability": "reasoning",
        "samples": 2,
        "score": 50.0,
        "letters": {"top_letter_share": 50.0, "best_constant_letter": 100.0, "letter_matches_text": None},
    }
    rows = [line for line in render_markdown([r]).splitlines() if " · " in line]
    assert rows == ["| perception · object_status | 75.00 |", "| reasoning · behavior | 50.00 |"]


def test_summarize_normalises_capabilities_and_types_of_items():
    items = [
        ItemScore("a", "Perception", "Object Status", 100.0, "language"),
        ItemScore("b", "perceptual", "object_status", 0.0, "language"),
        ItemScore("c", " PLAN ", "Plan", 40.0, "language"),
    ]
    r = summarize("x.jsonl", items)
    assert r["capabilities"] == {"perception": 50.0, "reasoning": None, "planning": 40.0}
    assert r["average"] == 45.0 and r["average_over"] == ["perception", "planning"]
    assert list(r["by_question_type"]) == ["object_status", "planning"]
    with pytest.raises(DataError, match=r"x.jsonl: item 'd'.*unknown capability 'steering'"):
        summarize("x.jsonl", [ItemScore("d", "steering", "q", 1.0, "language")])


def test_majority_baseline_groups_question_types_as_the_scorer_does():
    def mc(i, qt, letter):
        return Sample(
            f"s{i}", "perception", qt, [ImageRef("CAM_FRONT", "x.png")], "<image>q", "", "sc", CHOICES, letter
        )

    train = [mc(0, "Object Status", "C"), mc(1, "object-status", "C"), mc(2, "object_status", "A")]
    preds = majority_predictions(train, [mc(3, "object_status", "C")])
    assert parse_choice(preds[0], CHOICES) == "C"  # counted over all three spellings: "Turn right." twice


# ---------------------------------------------------------------- the study report reads the same


def test_study_report_marks_partial_averages_and_merges_type_spellings(tmp_path):
    from drivekd.study.report import collect, write_report

    out = tmp_path / "study"
    settings = {
        "name": "t", "teacher": "T", "student": "S", "student_epochs": 1, "student_lr": 1e-3, "scenes": 2,
        "split": "0.5/0.25/0.25", "data_seed": 0, "seeds": [0, 1], "variants": ["ce"], "kd_share": 0.5,
    }  # fmt: skip
    _write(out / "study.json", [json.dumps({"settings": settings})])
    full = [_mc(1, "perception", "Object Status", "A", "A"), _mc(2, "reasoning", "b", "A", "A")]
    _write(out / "preds" / "ce" / "seed-0" / "test.jsonl", [*full, _mc(3, "planning", "p", "B", "A")])
    _write(out / "preds" / "ce" / "seed-1" / "test.jsonl", [*full[1:], _mc(1, "perception", "object-status", "B", "A")])
    _write(out / "preds" / "majority" / "test.jsonl", full)  # no planning
    rows = {v["name"]: v for v in collect(out)["variants"]}
    assert rows["ce"]["types"] == {"object_status": 50.0, "b": 100.0, "p": 0.0}  # seeds 100 and 0: one row
    assert rows["ce"]["avg_lacks"]["average"] == ["planning"]  # seed 1 has no planning
    assert rows["majority"]["avg_lacks"]["average"] == ["planning"]
    report = write_report(out).read_text().splitlines()
    ce = next(line for line in report if line.startswith("| ce |"))
    assert "| 58.3 ± 11.8* |" in ce  # Avg 66.7 (seed 0, three capabilities) and 50.0 (seed 1, two)
    note = next(line for line in report if line.startswith("Avg* is the mean of fewer than the 3 capabilities"))
    assert note.endswith(": majority (test) has no planning; ce (test) has no planning.")
    assert "| object_status | 100.0 | 50.0 |" in report
    assert not any("Object Status" in line or "object-status" in line for line in report)
