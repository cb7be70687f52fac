import json
import random
import string
import time

import pytest
from click.testing import CliRunner

from drivekd.cli import main
from drivekd.data.formats import load_samples
from drivekd.errors import DataError
from drivekd.eval import metrics
from drivekd.eval.facts import fact_score
from drivekd.eval.parsing import letter_matches_text, parse_choice, parse_field, parse_final_set
from drivekd.eval.scoring import render_markdown, score_file

from .conftest import FIXTURES

CHOICES = {"A": "Going ahead.", "B": "Turn left.", "C": "Turn right.", "D": "Braking."}


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("Final: {C. Turn right.}", "C"),
        ("Final: C. Turn right.", "C"),
        ("Final: {C}", "C"),
        ("Reasoning first.\nFinal: {B. Turn left.}\nObject: black sedan", "B"),
        ("B. There is a car ahead.", "B"),  # DriveBench's parser says A
        ("(d)", "D"),
        ("(D)", "D"),
        ("(d) the car brakes", "D"),
        ("Answer: A", "A"),
        ("The answer is (b).", "B"),
        ("I pick option C because it turns.", "C"),
        ("C", "C"),
        ("c", "C"),
        ("  D  ", "D"),
        ("turn LEFT", "B"),
        ("Final: {Turn right.}", "C"),
        ("Final: braking", "D"),
        ("Draft: A.\nFinal: {D. Braking.}", "D"),  # the last Final wins
    ],
)
def test_parse_choice(prediction, letter):
    assert parse_choice(prediction, CHOICES) == letter


@pytest.mark.parametrize(
    "prediction",
    [
        "A car is ahead and it turns.",  # an article, not option A
        "the answer is a car",
        "Final: {E. Reverse.}",  # not one of the choices
        "E",
        "Turn",  # matches no option exactly
        "B or C",
        "",
        "Final:",
        "Final: {",
    ],
)
def test_parse_choice_unparseable(prediction):
    assert parse_choice(prediction, CHOICES) is None


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        # DriveBench/DriveLM-style free answers that state an option inside a sentence
        ("I think the vehicle will turn left at the junction.", "B"),
        ("The correct answer is B. Turn left.", "B"),
        ("Looking at the image, B turn left is most likely.", "B"),
        ("It is braking, so the answer should be braking.", "D"),
        ("A car in front is braking.", "D"),  # sentence-initial article, then an option's text
        # DriveBench's parser looks for the first capital A-D anywhere: "A" of the article wins there
        ("A white truck blocks the lane, so the answer is C.", "C"),
        ("The object is going ahead.", "A"),
    ],
)
def test_parse_choice_reads_options_stated_in_a_sentence(prediction, letter):
    assert parse_choice(prediction, CHOICES) == letter


@pytest.mark.parametrize(
    ("prediction", "choices", "letter"),
    [
        ("I choose (B) since the car is not going ahead.", CHOICES, "B"),  # the letter, not a negated text
        ("The vehicle is not braking.", CHOICES, None),
        ("It won't turn left.", CHOICES, None),
        (
            "The object is a pedestrian standing near a car.",
            {"A": "Car.", "B": "Pedestrian."},
            None,
        ),  # "a" is no letter
        ("There is a bus behind a car.", {"A": "Car", "B": "Truck", "C": "Bus"}, None),
        ("A truck is ahead.", {"A": "Car", "B": "Truck", "C": "Bus"}, "B"),  # sentence-initial article
    ],
)
def test_parse_choice_articles_negations_and_brackets(prediction, choices, letter):
    assert parse_choice(prediction, choices) == letter


def test_a_reference_letter_is_read_strictly():
    # a model answer may state an option in a sentence; a gold reference must mark it
    assert parse_choice("The vehicle is stopped at the light.", CHOICES | {"D": "Stopped."}) == "D"
    assert parse_choice("The vehicle is stopped at the light.", CHOICES | {"D": "Stopped."}, loose=False) is None


@pytest.mark.parametrize(
    "prediction",
    [
        "It could turn left or turn right.",  # two different options stated: no commitment
        "Going ahead, then braking.",
        "A car is turning.",  # no option's text, and "A" is an article
    ],
)
def test_parse_choice_two_options_stated_is_unparseable(prediction):
    assert parse_choice(prediction, CHOICES) is None


def test_parse_choice_prefers_the_longer_option_text():
    choices = {"A": "Left.", "B": "Turn left.", "C": "Right."}
    assert parse_choice("The car will turn left soon", choices) == "B"
    assert parse_choice("It drifts left.", choices) == "A"


def test_correct_letter_comes_from_the_reference_when_missing(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        _line(1, "perception", "q", "B", "Final: {B. Turn left.}", choices=CHOICES)
        + "\n"
        + _line(2, "perception", "q", "A. Going ahead.", "C. Turn right.", choices=CHOICES)
        + "\n"
    )
    r = score_file(f)
    assert r["by_question_type"]["q"]["score"] == 50.0 and r["language"]["bleu4"] is None  # scored as MC
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_line(1, "perception", "q", "B", "no letter here", choices=CHOICES) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: has 'choices' but no 'correct_choice'"):
        score_file(bad)


def test_parse_choice_only_returns_offered_letters():
    assert parse_choice("D. Braking.", {"A": "x", "B": "y"}) is None
    assert parse_choice("Going ahead.", {"A": "Going ahead.", "B": "going ahead"}) is None  # ambiguous text
    assert parse_choice("B", {}) is None


def test_parse_choice_never_raises():
    rng = random.Random(0)
    alphabet = string.printable + "{}()[]:：ÄΩ—\u0000\u200b"
    pieces = ["Final:", "Final: {", "}", "(", ")", "A.", "answer is", "option", "(b)", "\n", "Turn left."]
    nasty = [None, 3, b"A", "\x00", "(" * 5000, "Final:" * 2000, "A" * 10000, "{" * 3000 + "Final: {"]
    for _ in range(3000):
        k = rng.randint(0, 40)
        nasty.append("".join(rng.choice(pieces) if rng.random() < 0.2 else rng.choice(alphabet) for _ in range(k)))
    for text in nasty:
        got = parse_choice(text, CHOICES)  # type: ignore[arg-type]
        assert got is None or got in CHOICES
        parse_final_set(text)  # type: ignore[arg-type]
        parse_field(text, "Action")  # type: ignore[arg-type]


def test_parsers_stay_linear_on_long_blank_runs():
    # Regexes with adjacent whitespace quantifiers go quadratic here (minutes for 20k blanks).
    n = 20000
    texts = ["answer" + " " * n + "!", "answer is" + " " * n + ":" + " " * n + "!", "final" + " " * n + "x",
             "Final:" + " " * n, "A " * n, "<c1," + " " * n + "x", "1" * n + "x", "Action" + " " * n]  # fmt: skip
    start = time.monotonic()
    for text in texts:
        assert parse_choice(text, CHOICES) is None
        parse_final_set(text)
        parse_field(text, "Action")
        fact_score(text, {"count": 1})
        fact_score(text, {"object": "<c1,CAM_FRONT,0.5,0.5>"})
    assert time.monotonic() - start < 2.0


def test_parse_final_set_and_field():
    assert parse_final_set("Safe: IDLE\nFinal: {IDLE, SLOWER}") == ["IDLE", "SLOWER"]
    assert parse_final_set("Final: {none}") == []
    assert parse_final_set("final: LANE_LEFT and faster.\nReason: x") == ["LANE_LEFT", "faster"]
    assert parse_final_set("no final here") is None
    assert parse_field("Reason: x\n- Action: SLOWER \nAction: IDLE", "action") == "SLOWER"
    assert parse_field("- Self-vehicle action: LANE_RIGHT", "Self-vehicle action") == "LANE_RIGHT"
    assert parse_field("Actions: x", "Action") is None


def test_fact_checks():
    safe = {"safe_actions": ["IDLE"], "collision_actions": ["FASTER"]}
    assert fact_score("Final: {IDLE, SLOWER}", safe) == ("safe_actions", pytest.approx(200 / 3), "IDLE,SLOWER")
    assert fact_score("Safe: idle", safe)[1] == 100.0  # no Final: the Safe line
    assert fact_score("Final: {none}", {"safe_actions": []})[1] == 100.0
    assert fact_score("I do not know", safe)[1] == 0.0
    coll = {"collision_actions": ["LANE_LEFT", "FASTER"], "object": "<c1,CAM_FRONT,0.5,0.5>"}
    assert fact_score("Final: {FASTER}", coll)[:2] == ("collision_actions", pytest.approx(200 / 3))
    assert fact_score("Final: {4}", {"count": 4})[1] == 100.0
    assert fact_score("I can see 3 cars, maybe 4.", {"count": 4})[1] == 0.0
    assert fact_score("Count: <c1,CAM_FRONT,0.1,0.2> and 2 more", {"count": 2})[1] == 100.0  # c1 is no number
    assert fact_score("Action: slower.", {"action": "SLOWER"})[1] == 100.0
    assert fact_score("Final: {FASTER}", {"action": "SLOWER"})[1] == 0.0
    assert fact_score("Final: {The leftmost lane}", {"lane": "the leftmost lane"})[1] == 100.0
    near = {"object": "<c1,CAM_FRONT,0.5000,0.4375>"}
    assert fact_score("Final: {<c2,CAM_FRONT,0.54,0.40>}", near)[1] == 100.0
    assert fact_score("Final: {<c2,CAM_FRONT,0.56,0.40>}", near)[1] == 0.0  # 0.06 off in x
    assert fact_score("Final: {<c2,CAM_BACK,0.5,0.4375>}", near)[1] == 0.0  # other camera
    assert fact_score("anything", {"label": "x", "camera": "CAM_FRONT"}) is None
    # dense object questions: the attribute decides, not the tag the question is about
    lights = {"attribute": "brake lights lit", "object": "<c1,CAM_FRONT,0.5,0.5>"}
    assert fact_score("Brake lights lit.", lights) == ("attribute", 100.0, "brake lights lit")
    assert fact_score("No lights.\nsomething else", lights)[1] == 0.0
    assert fact_score("Final: {Red}", {"attribute": "red"})[1] == 100.0
    assert fact_score("Red car.", {"attribute": "red"})[1] == 0.0  # the whole phrase, not a prefix
    assert fact_score("", {"attribute": "red"}) == ("attribute", 0.0, None)


def _line(i, cap, qt, pred, ref, **extra):
    return json.dumps(
        {"id": f"s{i}", "capability": cap, "question_type": qt, "prediction": pred, "reference": ref, **extra}
    )


def _mc(i, cap, qt, pred, correct):
    return _line(i, cap, qt, pred, f"Final: {{{correct}. {CHOICES[correct]}}}", choices=CHOICES, correct_choice=correct)


@pytest.fixture
def pred_file(tmp_path):
    lines = [
        _mc(1, "perception", "object_status", "Final: {B. Turn left.}", "B"),  # 100
        _mc(2, "perception", "object_status", "B. There is a car ahead.", "A"),  # 0
        _mc(3, "perceptual", "object_status", "no idea", "C"),  # 0, unparseable
        _line(4, "perception", "count_vehicles", "Count: 3 vehicles.\nFinal: {3}", "Final: {3}", facts={"count": 3}),
        _mc(5, "behavior", "ego_behavior", "(c)", "C"),  # 100
        _mc(6, "reasoning", "key_object", "Answer: D", "A"),  # 0
        _line(
            7, "planning", "safe_actions", "Final: {IDLE, SLOWER}", "Final: {IDLE}", facts={"safe_actions": ["IDLE"]}
        ),
        _line(8, "planning", "collision_object", "Final: {LANE_LEFT}", "x", facts={"collision_actions": ["LANE_LEFT"]}),
        # Open-ended without facts: a perfect answer and a useless one.
        _line(9, "planning", "free_text", "the ego should slow down gently", "the ego should slow down gently"),
        _line(10, "planning", "free_text", "zebra", "keep the lane at the same speed"),
    ]
    f = tmp_path / "model-a.jsonl"
    f.write_text("\n".join(lines) + "\n\n")
    return f


def test_score_file_numbers(pred_file):
    r = score_file(pred_file)
    assert r["file"] == str(pred_file) and r["samples"] == 10
    assert r["capabilities"] == {
        "perception": pytest.approx(50.0),  # 100, 0, 0, 100
        "reasoning": pytest.approx(50.0),
        "planning": pytest.approx((200 / 3 + 100 + 100 + 0) / 4, abs=1e-4),
    }
    assert r["average"] == pytest.approx((50 + 50 + (200 / 3 + 200) / 4) / 3, abs=1e-4)
    assert r["unparseable"] == 1
    assert r["by_question_type"]["object_status"] == {
        "capability": "perception",
        "samples": 3,
        "score": pytest.approx(100 / 3, abs=1e-4),
        "letters": {
            "top_letter_share": pytest.approx(200 / 3, abs=1e-3),
            "best_constant_letter": pytest.approx(100 / 3, abs=1e-3),
            "letter_matches_text": 100.0,  # only item 1 writes an option's text after its letter
        },
    }
    assert r["by_question_type"]["count_vehicles"]["score"] == 100.0
    assert r["by_question_type"]["free_text"] == {"capability": "planning", "samples": 2, "score": 50.0}
    assert list(r["by_question_type"]) == [
        "count_vehicles", "object_status", "ego_behavior", "key_object", "collision_object", "free_text", "safe_actions"
    ]  # fmt: skip
    # Corpus language metrics over the five open-ended samples.
    preds = [
        "Count: 3 vehicles.\nFinal: {3}",
        "Final: {IDLE, SLOWER}",
        "Final: {LANE_LEFT}",
        "the ego should slow down gently",
        "zebra",
    ]
    refs = ["Final: {3}", "Final: {IDLE}", "x", "the ego should slow down gently", "keep the lane at the same speed"]
    import sacrebleu

    assert r["language"]["bleu4"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score, abs=1e-4)
    assert r["language"]["rougeL"] == pytest.approx(100 * metrics.corpus_rouge_l(preds, refs), abs=1e-4)
    assert r["language"]["cider"] == pytest.approx(metrics.cider_d(preds, [[x] for x in refs])[0], abs=1e-4)
    json.dumps(r)  # plain JSON


def test_reference_answers_score_full_marks(tmp_path):
    samples = load_samples(FIXTURES / "reference-demo.json", "reference", ())
    f = tmp_path / "ref.jsonl"
    rows = [
        {"id": s.id, "capability": s.capability, "question_type": s.question_type, "prediction": s.answer,
         "reference": s.answer, "choices": s.choices, "correct_choice": s.correct_choice}
        for s in samples
    ]  # fmt: skip
    f.write_text("\n".join(json.dumps(r) for r in rows))
    r = score_file(f)
    assert r["unparseable"] == 0
    mc = [s for s in samples if s.choices]
    assert len(mc) == 2 and r["capabilities"]["perception"] is not None
    assert r["language"]["bleu4"] == pytest.approx(100.0) and r["language"]["rougeL"] == pytest.approx(100.0)


def test_empty_file_is_refused_and_missing_capabilities_are_none(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: no predictions \(the file is empty\)"):
        score_file(f)
    f.write_text(_mc(1, "perception", "q", "A", "A") + "\n")
    r = score_file(f)
    assert r["samples"] == 1 and r["average"] == 100.0 and r["average_over"] == ["perception"]
    assert r["capabilities"] == {"perception": 100.0, "reasoning": None, "planning": None}
    assert r["language"] == {"bleu4": None, "rougeL": None, "cider": None}


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ('{"id": 1, "capability": "planning"\n', [":1:", "malformed JSON"]),
        (
            _line(1, "planning", "q", "a", "b")
            + "\n"
            + json.dumps({"id": 2, "capability": "planning", "question_type": "q", "prediction": "a"}),
            [":2:", "'reference'"],
        ),
        (_line(1, "steering", "q", "a", "b"), [":1:", "capability", "steering"]),
        (_line(1, "planning", "q", "a", "b", choices={"A": "x"}, correct_choice="Z"), [":1:", "correct_choice"]),
        (_line(1, "planning", "q", "a", "b") + "\n" + _line(1, "planning", "q", "a", "b"), [":2:", "duplicate id"]),
        (_line(1, "planning", "q", "a", "b", facts={"count": "many"}), [":1:", "count"]),
        ("[1, 2]", [":1:", "JSON object"]),
    ],
)
def test_bad_input_names_file_line_and_field(tmp_path, content, needles):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DataError) as e:
        score_file(f)
    for needle in [str(f), *needles]:
        assert needle in str(e.value)


def test_markdown_side_by_side(pred_file, tmp_path):
    other = tmp_path / "b" / "model-a.jsonl"  # same stem: columns fall back to paths
    other.parent.mkdir()
    other.write_text(_mc(1, "perception", "object_status", "A", "A") + "\n")
    table = render_markdown([score_file(pred_file), score_file(other)])
    lines = table.splitlines()
    assert lines[0] == f"| | {pred_file} | {other} |"
    assert "| **Perception** | 50.00 | 100.00 |" in lines
    assert "| **Planning** | 66.67 | – |" in lines
    assert "| perception · object_status | 33.33 | 100.00 |" in lines
    assert "| MC unparseable | 1 | 0 |" in lines
    assert [line.split(" | ")[0] for line in lines[2:6]] == [
        "| **Perception**",
        "| **Reasoning**",
        "| **Planning**",
        "| **Avg**",
    ]


def test_cli_table_json_and_errors(pred_file, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["score", str(pred_file)])
    assert res.exit_code == 0, res.output
    assert "| **Avg** |" in res.output and "model-a" in res.output
    res = runner.invoke(main, ["score", str(pred_file), str(pred_file), "--json"])
    assert res.exit_code == 0, res.output
    objs = [json.loads(line) for line in res.output.splitlines()]
    assert len(objs) == 2 and objs[0]["capabilities"]["reasoning"] == 50.0 and objs[0]["unparseable"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    res = runner.invoke(main, ["score", str(bad)])
    assert res.exit_code == 2
    assert res.output.strip() == f"error: {bad}:1: missing required field 'capability'"
    res = runner.invoke(main, ["score", str(pred_file), "--judge-url", "http://127.0.0.1:9"])
    assert res.exit_code == 2 and "--judge-model" in res.output


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("Final: {B. Turn left.}\nObject: red car", True),
        ("Final: {D. Turn left.}", False),  # D is Braking: the letter was not looked up
        ("Draft: A. Going ahead.\nFinal: {c) turn RIGHT}", True),  # last Final, case and marks ignored
        ("C. Going ahead.", False),  # no Final: the first line
        ("Final: {B}", None),  # a letter alone: nothing to compare
        ("Final: {B. a car on the left}", None),  # free text, not an option
        ("Final: {Turn left.}", None),  # text alone, no letter
        ("A car is ahead, turn left.", None),  # an article, not option A
        ("Final: {E. Turn left.}", None),  # not a letter of these choices
        (None, None),
    ],
)
def test_letter_matches_text(prediction, expected):
    assert letter_matches_text(prediction, CHOICES) is expected


def test_letter_bias_exposes_a_one_letter_model(tmp_path):
    # 5 colour items whose correct letters are D, D, D, A, B; 2 status items (C, A) -> pooled over 7
    gold = [("colour", "D"), ("colour", "D"), ("colour", "D"), ("colour", "A"), ("colour", "B")]
    gold += [("status", "C"), ("status", "A")]
    choices = {k: f"option {k}" for k in "ABCD"}
    lines = [
        _line(i, "perception", qt, "Final: {D. option D}", f"Final: {{{g}. x}}", choices=choices, correct_choice=g)
        for i, (qt, g) in enumerate(gold)
    ]
    f = tmp_path / "one-letter.jsonl"
    f.write_text("\n".join(lines) + "\n")
    r = score_file(f)
    assert r["by_question_type"]["colour"]["score"] == pytest.approx(60.0)
    letters = {"top_letter_share": 100.0, "letter_matches_text": 100.0}
    assert r["by_question_type"]["colour"]["letters"] == {**letters, "best_constant_letter": 60.0}
    assert r["by_question_type"]["status"]["letters"] == {**letters, "best_constant_letter": 50.0}
    assert r["letters"] == {**letters, "best_constant_letter": pytest.approx(400 / 7, abs=1e-3)}
    open_ended = tmp_path / "open.jsonl"
    open_ended.write_text(_line(1, "planning", "q", "a", "b") + "\n")
    assert score_file(open_ended)["letters"] is None
    assert "MC best constant letter % | 57.14" in render_markdown([r])
    assert "MC letter names the option text written % | 100" in render_markdown([r])
    shuffled = tmp_path / "unlooked.jsonl"  # right texts under letters drawn without looking: 1 of 4 agree
    shuffled.write_text(
        "\n".join(
            _mc(i, "perception", "colour", f"Final: {{{letter}. {CHOICES[correct]}}}", correct)
            for i, (letter, correct) in enumerate([("A", "A"), ("A", "B"), ("B", "C"), ("C", "D")])
        )
        + "\n"
    )
    assert score_file(shuffled)["letters"]["letter_matches_text"] == 25.0
