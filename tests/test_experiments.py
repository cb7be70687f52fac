"""The scripts behind the docs' figures: experiments/*.py and scripts/*.py import without side
effects, have a main(), and the ones that can run in a test do what their figures say."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
SCRIPTS = sorted([*(ROOT / "experiments").glob("*.py"), *(ROOT / "scripts").glob("*.py")])


def load(path: Path):
    name = f"_doc_script_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing look modules up by name
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_there_are_scripts():
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {"experiments/gradstats.py", "scripts/draw_training_step.py"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_script_imports_without_running_and_has_main(path, capsys):
    module = load(path)
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"
    assert module.__doc__, f"{path.name} has no docstring saying what it measures"
    assert capsys.readouterr().out == "", f"importing {path.name} printed something"


def test_draw_training_step_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "step.png"
    assert load(ROOT / "scripts" / "draw_training_step.py").main(["--out", str(out)]) == out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert 800 <= width <= 3000 and 600 <= height <= 3000
    assert len(data) > 20_000  # boxes and text, not an empty canvas


def _step(step, ce, losses, cos, conflict, coef):
    row = {"step": step, "epoch": 0, "lr": 0.001, "samples_per_s": 12.0, "ce": ce, **losses}
    row.update({f"cos/{k}": v for k, v in cos.items()})
    row["conflict_rate"] = conflict
    row.update({f"coef/{k}": v for k, v in coef.items()})
    return row


def test_gradstats_on_a_run_shaped_metrics_file(tmp_path, capsys):
    # the rows a `drivekd distill` run with AGP writes: loss weights at step 0, logged steps, validation
    rows = [
        {
            "step": 0,
            "data_train": 993,
            "data_val": 172,
            "loss_weight/perception": 24416.1,
            "loss_weight/reasoning": 19570.8,
            "loss_weight/planning": 1.13883,
        },
        _step(
            10,
            6.0,
            {"perception": 0.6, "reasoning": 0.3, "planning": 0.9},
            {
                "ce~perception": 0.01,
                "ce~reasoning": -0.03,
                "ce~planning": 0.02,
                "perception~reasoning": -0.1,
                "perception~planning": 0.0,
                "reasoning~planning": 0.05,
            },
            0.5,
            {"ce": 3.0, "perception": 1.0, "reasoning": 1.0, "planning": 1.0},
        ),
        _step(
            20,
            0.5,
            {"perception": 0.1, "reasoning": 0.15, "planning": 0.3},
            {
                "ce~perception": -0.03,
                "ce~reasoning": 0.01,
                "ce~planning": 0.04,
                "perception~reasoning": -0.2,
                "perception~planning": 0.02,
                "reasoning~planning": -0.05,
            },
            0.25,
            {"ce": 3.02, "perception": 1.0, "reasoning": 1.0, "planning": 1.0},
        ),
        {"step": 20, "val_ce": 0.52, "val_perception": 0.1, "val_reasoning": 0.1, "val_planning": 0.2},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    gradstats = load(ROOT / "experiments" / "gradstats.py")
    stats = gradstats.main([str(path)])[str(path)]
    assert stats["steps"] == 2 and (stats["first_step"], stats["last_step"]) == (10, 20)
    assert list(stats["abs_cos_ce"]) == ["perception", "reasoning", "planning"]  # logged order
    assert stats["abs_cos_ce"] == pytest.approx({"perception": 0.02, "reasoning": 0.02, "planning": 0.03})
    assert stats["cos_ce"] == pytest.approx({"perception": -0.01, "reasoning": -0.01, "planning": 0.03})
    assert stats["cos_signals"] == pytest.approx(
        {"perception~reasoning": -0.15, "perception~planning": 0.01, "reasoning~planning": 0.0}
    )
    assert stats["conflict_rate"] == pytest.approx(0.375)
    assert stats["ratio_first"] == pytest.approx({"perception": 0.1, "reasoning": 0.05, "planning": 0.15})
    assert stats["ratio_last"] == pytest.approx({"perception": 0.2, "reasoning": 0.3, "planning": 0.6})
    assert stats["sum_ratio_first"] == pytest.approx(0.3) and stats["sum_ratio_last"] == pytest.approx(1.1)
    assert stats["fall"] == pytest.approx({"ce": 12.0, "perception": 6.0, "reasoning": 2.0, "planning": 3.0})
    assert stats["coef"] == pytest.approx({"ce": 3.01, "perception": 1.0, "reasoning": 1.0, "planning": 1.0})
    out = capsys.readouterr().out
    assert "mean |cos(CE, signal)|: perception 0.020, reasoning 0.020, planning 0.030" in out
    assert "mean conflict rate: 0.375" in out

    # two runs: the range over them
    other = tmp_path / "other.jsonl"
    other.write_text(path.read_text().replace('"cos/ce~perception": 0.01,', '"cos/ce~perception": 0.05,'))
    both = gradstats.main([str(path), str(other)])
    assert gradstats.summarize(both)["abs_cos_ce/perception"] == pytest.approx([0.02, 0.04])
    assert "over the runs: abs_cos_ce/perception 0.020–0.040" in capsys.readouterr().out


def test_gradstats_refuses_a_run_without_gradients(tmp_path):
    # a `sum` run logs losses but no gradient cosines: nothing to measure
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 10, "ce": 6.6}) + "\n")
    with pytest.raises(ValueError, match="no logged training step"):
        load(ROOT / "experiments" / "gradstats.py").main([str(path)])


def test_mc_as_text_wrong_letters_score_zero_by_letter_and_high_as_text(tmp_path):
    rows = [
        {
            "id": f"q{i}",
            "capability": cap,
            "question_type": "ego_lane",
            "answer": f"Final: {{B. {text}}}\nEvidence: lane markings on both sides, {i} m ahead.",
            "choices": {"A": "Left lane.", "B": text, "C": "Right lane."},
            "correct_choice": "B",
        }
        for i, (cap, text) in enumerate(
            [
                ("perception", "Middle lane."),
                ("reasoning", "Middle lane."),
                ("planning", "Middle lane."),
                ("perception", "Middle lane."),
            ]
        )
    ]
    rows.append({"id": "open", "capability": "planning", "question_type": "safe_actions", "answer": "Brake."})
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mc = load(ROOT / "experiments" / "mc_as_text.py")
    assert mc.wrong_letter("Final: {B. Middle lane.}", rows[0]["choices"], "B") == "Final: {C. Middle lane.}"
    out = mc.main([str(path)])
    assert out["items"] == 4  # the open-ended item is not multiple choice
    assert out["by letter"] == 0.0
    assert out["as text"] > 50.0


def test_hash_cost_times_both_rules(tmp_path):
    hc = load(ROOT / "experiments" / "hash_cost.py")
    seconds = hc.main(["--files", "3", "--kb", "100", "--dir", str(tmp_path)])
    assert set(seconds) == {"whole file", "first 64 KiB"} and all(s >= 0 for s in seconds.values())
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 70_000)
    head, whole = hc.hash_head(f), hc.hash_whole(f)
    f.write_bytes(b"x" * 69_999 + b"y")  # a change past the first 64 KiB: only the whole-file rule sees it
    assert hc.hash_head(f) == head
    assert hc.hash_whole(f) != whole


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_profile_loads_as_a_study_profile(path):
    from drivekd.study.profiles import PROFILES, load_profile

    profile = load_profile(path)
    assert profile.name not in PROFILES  # its study folder cannot be taken for a shipped profile's
