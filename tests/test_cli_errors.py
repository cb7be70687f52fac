import json

import pytest

from .conftest import run_cli

pytestmark = pytest.mark.integration  # CLI in subprocesses, builds and studies end to end


def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_malformed_json_names_line_and_column(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n  {"messages": [}\n]')
    _one_line_error(run_cli("data", "validate", str(f), "--format", "reference"), str(f), ":2:", "malformed JSON")


def test_malformed_jsonl_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    good = {"id": "a", "capability": "plan", "images": [], "question": "q", "answer": "a"}
    f.write_text(json.dumps(good) + '\n{"id": \n')
    _one_line_error(run_cli("data", "validate", str(f)), f"{f}:2:", "malformed JSON")


def test_missing_field_names_item_and_field(tmp_path):
    f = tmp_path / "ref.json"
    f.write_text(json.dumps([{"messages": [], "images": [], "question_type": "perception"}, {"images": []}]))
    _one_line_error(run_cli("data", "validate", str(f), "--format", "reference"), "item 0", "messages[role=user]")
    f.write_text(
        json.dumps(
            [
                {
                    "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                    "images": [],
                    "question_type": "plan",
                },
                {"messages": [], "images": []},
            ]
        )
    )
    _one_line_error(
        run_cli("data", "validate", str(f), "--format", "reference"), "item 1", "missing required field 'question_type'"
    )


def test_unknown_capability(tmp_path):
    f = tmp_path / "ref.json"
    f.write_text(
        json.dumps(
            [
                {
                    "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                    "images": [],
                    "question_type": "steering",
                }
            ]
        )
    )
    _one_line_error(
        run_cli("data", "validate", str(f)), "item 0", "unknown capability 'steering'", "accepted:", "perception"
    )


def test_missing_image_names_sample_and_path(drivebench_file):
    (drivebench_file.parent / "samples/CAM_BACK/b.jpg").unlink()
    result = run_cli("data", "validate", str(drivebench_file), "--json")
    _one_line_error(result, "sample fr1:0", "samples/CAM_BACK/b.jpg", "missing")
    report = json.loads(result.stdout)
    assert report["missing_images"] == [str((drivebench_file.parent / "samples/CAM_BACK/b.jpg").resolve())]
    assert report["samples"] == 4
    # the same file is fine when image checks are off
    ok = run_cli("data", "validate", str(drivebench_file), "--no-image-check", "--json")
    assert ok.returncode == 0, ok.stderr


def test_unreadable_image(drivebench_file):
    (drivebench_file.parent / "samples/CAM_FRONT/c.jpg").write_bytes(b"not an image")
    _one_line_error(run_cli("data", "validate", str(drivebench_file)), "sample fr2:2", "c.jpg", "unreadable")


def test_validate_json_counts(drivebench_file):
    result = run_cli("data", "validate", str(drivebench_file), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["by_capability"] == {"perception": 1, "reasoning": 2, "planning": 1}
    assert report["by_question_type"] == {"behavior": 1, "perception": 1, "planning": 1, "prediction": 1}
    assert report["missing_images"] == []
    assert report["images_referenced"] == 3


def test_debug_shows_traceback(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("{")
    result = run_cli("--debug", "data", "validate", str(f))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_failed_convert_leaves_nothing(tmp_path):
    good = tmp_path / "ref.json"
    rows = [
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "images": [],
            "question_type": "perception",
        }
    ] * 3
    rows = [dict(r) for r in rows]
    rows[2]["question_type"] = "nonsense"
    good.write_text(json.dumps(rows))
    out = tmp_path / "out" / "native.jsonl"
    _one_line_error(run_cli("data", "convert", str(good), str(out)), "item 2", "unknown capability")
    assert not out.exists()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_convert_then_validate(drivelm_file, tmp_path):
    out = tmp_path / "conv" / "all.jsonl"
    r = run_cli("data", "convert", str(drivelm_file), str(out))
    assert r.returncode == 0, r.stderr
    v = run_cli("data", "validate", str(out), "--json")
    assert v.returncode == 0, v.stderr
    assert json.loads(v.stdout)["samples"] == 4


def test_help_pages():
    r = run_cli("--help")
    assert r.returncode == 0 and "data" in r.stdout
    r = run_cli("data", "generate", "--help")
    assert r.returncode == 0 and "--scenes" in r.stdout and "--workers" in r.stdout


def test_json_lines_in_a_json_file_name_the_real_column(tmp_path):
    f = tmp_path / "bad.json"
    good = {"id": "a", "capability": "plan", "images": [], "question": "q", "answer": "a"}
    f.write_text(json.dumps(good) + '\n{"id": "b",, "x": 1}\n')
    _one_line_error(run_cli("data", "validate", str(f)), f"{f}:2:12:", "malformed JSON")


def test_misspelled_override_is_reported_against_the_command_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: tiny-internvl-student}\ndata: {path: nowhere}\ntrain: {output_dir: r}\n")
    _one_line_error(run_cli("sft", "--config", str(cfg), "train.lrr=1e-3"), "override 'train.lrr=1e-3'", "train.lrr")
    r = run_cli("sft", "--config", str(cfg), "train.lrr=1e-3")
    assert str(cfg) not in r.stderr


def test_data_split_by_scene(tmp_path, drivelm_file):
    import copy

    data = json.loads(drivelm_file.read_text())
    scene = data["scene-a"]
    for i in range(9):  # ten scenes in all, four questions each (frame tokens are unique, as in DriveLM)
        data[f"scene-{i}"] = {"key_frames": {f"frame-x{i}": copy.deepcopy(scene["key_frames"]["frame-1"])}}
    drivelm_file.write_text(json.dumps(data))
    out = tmp_path / "split"
    r = run_cli("data", "split", str(drivelm_file), str(out), "--val", "0.2", "--test", "0.2", "--seed", "1")
    assert r.returncode == 0, r.stderr
    splits = {
        n: [json.loads(x) for x in (out / f"{n}.jsonl").read_text().splitlines()] for n in ("train", "val", "test")
    }
    assert [len(splits[n]) for n in ("train", "val", "test")] == [24, 8, 8]
    scenes = {n: {s["scene_id"] for s in items} for n, items in splits.items()}
    assert not (scenes["train"] & scenes["val"]) and not (scenes["train"] & scenes["test"])
    assert run_cli("data", "validate", str(out)).returncode == 0  # image paths still resolve
    again = tmp_path / "again"
    run_cli("data", "split", str(drivelm_file), str(again), "--val", "0.2", "--test", "0.2", "--seed", "1")
    assert (again / "test.jsonl").read_text() == (out / "test.jsonl").read_text()  # seeded
    _one_line_error(run_cli("data", "split", str(drivelm_file), str(out)), str(out), "already exists")
