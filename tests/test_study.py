"""`drivekd reproduce`: a tiny end-to-end study, its resumption, refusal and failure handling."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from drivekd.errors import DriveKDError
from drivekd.study import runner
from drivekd.study.profiles import PROFILES, Profile, load_variants
from drivekd.study.report import beyond_spread
from tests.conftest import run_cli

pytestmark = pytest.mark.integration  # CLI in subprocesses, builds and studies end to end

TINY = Profile(
    name="tiny",
    scenes=4,
    data_seed=5,
    teacher="tiny-internvl-teacher",
    student="tiny-internvl-student",
    student_epochs=0.5,
    student_lr=2e-3,
    seeds=(0,),
    variants=("ce", "single-teacher", "multi-agp"),
    prestudy_samples=8,
    bench_repeats=1,
    eval_max_new_tokens=8,
)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "s"
    report = runner.Study(out, TINY, workers=1, echo=lambda _: None).run()
    assert report == out / "report.md"
    return out


def test_study_writes_every_artefact(study):
    results = json.loads((study / "results.json").read_text())
    rows = {v["name"]: v for v in results["variants"]}
    assert set(rows) == {"teacher", "majority", "ce", "single-teacher", "multi-agp"}
    for name in ("ce", "single-teacher", "multi-agp"):
        row = rows[name]
        assert [s["seed"] for s in row["seeds"]] == [0] and row["failed"] == []
        assert set(row["capabilities"]) == {"perception", "reasoning", "planning"}
        assert 0 <= row["average"] <= 100 and row["std"]["average"] == 0.0
    # single-teacher: one student per capability, each scored on its own split only
    for cap in ("perception", "reasoning", "planning"):
        assert (study / "runs" / "single-teacher" / "seed-0" / cap / "final" / "model.safetensors").is_file()
        recipe = yaml.safe_load((study / "recipes" / f"prestudy-{cap}@{TINY.kd_share:g}.yaml").read_text())
        assert list(recipe) == [cap] and recipe[cap]["weight"] > 0
    preds = [
        json.loads(x) for x in (study / "preds" / "single-teacher" / "seed-0" / "test.jsonl").read_text().splitlines()
    ]
    test = [json.loads(x) for x in (study / "data" / "test.jsonl").read_text().splitlines()]
    assert sorted(p["id"] for p in preds) == sorted(s["id"] for s in test)
    # calibration: weight x initial loss == share x CE for every signal
    cal = json.loads((study / "recipes" / "calibration.json").read_text())["recipes"]["prestudy"]
    for name, weight in cal["weights"].items():
        assert weight * cal["initial_losses"][name] == pytest.approx(
            TINY.kd_share * cal["initial_losses"]["ce"], rel=1e-5
        )
    infer = json.loads((study / "bench" / "infer.json").read_text())
    assert [m["name"] for m in infer["models"]][-1].endswith("int8")
    report = (study / "report.md").read_text()
    assert "| multi-agp |" in report and "Deployment" in report
    assert (study / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert (study / "prestudy" / "prestudy.json").is_file()
    # the layers each pre-study signal ties, by depth: never the 4-layer student's last one
    line = next(x for x in report.splitlines() if x.startswith("Student layer <- teacher layer(s)"))
    from drivekd.distill.engine import load_recipe

    for name, sig in load_recipe(str(study / "prestudy" / "recipe.yaml")).items():
        pairs = sig.pairs(4, 8)
        assert all(s < 3 for s, _ in pairs)
        assert f"{name}: {pairs[0][0]} <- " in line


def test_finished_runs_are_not_redone(study, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    for name in ("generate_data", "prestudy", "calibrate", "train_student", "bench"):
        monkeypatch.setattr(runner.Study, name, boom)
    monkeypatch.setattr(runner.Study, "evaluate_students", boom)
    runner.Study(study, TINY, echo=lambda _: None).run()


def test_failed_run_is_marked_and_the_study_goes_on(study, tmp_path, monkeypatch):
    out = tmp_path / "s"
    shutil.copytree(study, out, ignore=shutil.ignore_patterns("runs", "preds", "bench"))
    for keep in ("teacher", "majority"):
        shutil.copytree(study / "preds" / keep, out / "preds" / keep)
    original = runner.Study.train_student

    def dies_for_agp(self, run):
        if run.variant.name == "multi-agp":
            raise RuntimeError("simulated out-of-memory")
        return original(self, run)

    monkeypatch.setattr(runner.Study, "train_student", dies_for_agp)
    monkeypatch.setattr(runner.Study, "bench", lambda self: None)
    profile = TINY
    runner.Study(out, profile, echo=lambda _: None).run()
    rows = {v["name"]: v for v in json.loads((out / "results.json").read_text())["variants"]}
    assert rows["multi-agp"]["failed"] == [{"seed": 0, "error": "RuntimeError: simulated out-of-memory"}]
    assert rows["ce"]["average"] is not None  # the others still ran
    assert "simulated out-of-memory" in (out / "report.md").read_text()


def test_other_configuration_is_refused(study):
    other = Profile(**{**TINY.__dict__, "student_lr": 1e-3})
    with pytest.raises(DriveKDError, match="student_lr"):
        runner.Study(study, other).claim()


def test_unrelated_directory_is_refused_by_the_cli(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = run_cli("reproduce", "--profile", "quick", "--out", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not a drivekd study" in r.stderr


def test_profiles_name_known_variants():
    variants = load_variants()
    for profile in PROFILES.values():
        assert set(profile.variants) <= set(variants)
    assert {"ce", "multi-agp"} <= set(PROFILES["quick"].variants)
    assert len(PROFILES["ablations"].seeds) >= 3 and set(PROFILES["ablations"].variants) == set(variants)
    full = PROFILES["full"]
    assert len(full.seeds) >= 3 and {"ce", "ce-kl", "ce-hidden", "multi-agp"} <= set(full.variants)


def test_a_variants_mixing_reaches_its_distillation_config_and_old_studies_keep_their_settings(study, tmp_path):
    variants = load_variants()
    assert "mixing" not in variants["multi-agp"].definition()  # studies begun before the field resume
    assert variants["multi-agp-identity"].definition()["mixing"] == "identity"
    profile = Profile(**{**TINY.__dict__, "variants": ("ce", "multi-agp", "multi-agp-identity", "multi-agp-uniform")})
    s = runner.Study(study, profile, echo=lambda _: None)  # its calibrated pre-study recipe
    mixing = {
        name: s.student_config(runner.StudentRun(variants[name], 0, None)).mixing
        for name in ("multi-agp", "multi-agp-identity", "multi-agp-uniform")
    }
    assert mixing == {
        "multi-agp": "reference",
        "multi-agp-identity": "identity",
        "multi-agp-uniform": [[1.0, 1.0, 1.0]] * 3,
    }
    bad = tmp_path / "variants.yaml"
    bad.write_text("x: {recipe: prestudy, mix: identity}\n")
    with pytest.raises(DriveKDError, match=r"variant 'x': unknown field\(s\) \['mix'\]"):
        load_variants(bad)
    bad.write_text("x: {recipe: prestudy, mixing: identiy}\n")
    with pytest.raises(DriveKDError, match=r"variant 'x': mixing must be identity, reference or a matrix"):
        load_variants(bad)


def test_seed_spread_rule():
    a = {"seeds": [1, 2], "average": 50.0, "std": {"average": 1.0}}
    b = {"seeds": [1, 2], "average": 47.5, "std": {"average": 1.0}}
    assert beyond_spread(a, b) is True
    assert beyond_spread(a, {**b, "average": 48.5}) is False
    assert beyond_spread(a, {**b, "seeds": [1]}) is None


def test_seed_outside_the_profile_is_refused(study):
    with pytest.raises(DriveKDError, match=r"seed\(s\) \[7\]"):
        runner.Study(study, TINY, echo=lambda _: None).run(seeds=[7])


def test_report_only_trains_nothing(study, monkeypatch):
    (study / "report.md").unlink()
    monkeypatch.setattr(runner.Study, "train_student", lambda *a: (_ for _ in ()).throw(AssertionError("trained")))
    assert runner.Study(study, TINY, echo=lambda _: None).report() == study / "report.md"
    assert "| ce |" in (study / "report.md").read_text()


def test_a_data_seed_the_teacher_was_trained_on_is_refused(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "card.json").write_text(json.dumps({"seeds": [5, 101]}))
    profile = Profile(**{**TINY.__dict__, "teacher": str(teacher)})
    with pytest.raises(DriveKDError, match=r"data seed 5 is one the teacher .* was trained on"):
        runner.Study(tmp_path / "s", profile).claim()
    reserved = Profile(**{**TINY.__dict__, "data_seed": 150})
    with pytest.raises(DriveKDError, match="reserved for the shipped bases"):
        runner.Study(tmp_path / "s2", reserved).claim()
    assert not (tmp_path / "s").exists() and not (tmp_path / "s2").exists()


def test_a_study_begun_with_other_teacher_weights_is_refused(tmp_path):
    # the shipped teacher keeps its name when it is rebuilt; its card's hash tells the two apart
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    card = teacher / "card.json"
    card.write_text(json.dumps({"seeds": [101], "weights_sha256": "a" * 64}))
    profile = Profile(**{**TINY.__dict__, "teacher": str(teacher)})
    runner.Study(tmp_path / "s", profile).claim()
    settings = json.loads((tmp_path / "s" / "study.json").read_text())["settings"]
    assert settings["teacher_weights_sha256"] == "a" * 64 and "student_weights_sha256" not in settings
    runner.Study(tmp_path / "s", profile).claim()  # the same weights resume
    card.write_text(json.dumps({"seeds": [101], "weights_sha256": "b" * 64}))
    with pytest.raises(DriveKDError, match="differs in: teacher_weights_sha256"):
        runner.Study(tmp_path / "s", profile).claim()


def test_parallel_jobs_run_exactly_the_missing_steps(study, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(study, out, ignore=shutil.ignore_patterns("mechanism.json"))
    for name in ("teacher", "majority"):
        shutil.rmtree(out / "preds" / name)
    s = runner.Study(out, TINY, jobs=2, echo=lambda _: None)
    plan = s.plan(None)
    assert [step.name for step in plan] == [
        "eval teacher test",
        "eval teacher test-other-images",
        "eval majority val",
        "eval majority test",
        "mechanism",
    ]
    assert all(step.needs == () for step in plan)  # what they read is done
    s.execute(plan)
    for split in ("val", "test"):
        assert (out / "preds" / "majority" / f"{split}.jsonl").read_text() == (
            study / "preds" / "majority" / f"{split}.jsonl"
        ).read_text()
    assert not (out / "preds" / "teacher" / "val.jsonl").exists()
    for split in ("test", "test-other-images"):
        ids = [json.loads(x)["id"] for x in (out / "preds" / "teacher" / f"{split}.jsonl").read_text().splitlines()]
        want = [json.loads(x)["id"] for x in (study / "preds" / "teacher" / f"{split}.jsonl").read_text().splitlines()]
        assert ids == want
    assert set(json.loads((out / "mechanism.json").read_text())) == set(
        json.loads((study / "mechanism.json").read_text())
    )
    timed = [json.loads(x)["step"] for x in (out / "timings.jsonl").read_text().splitlines()]
    assert timed[-len(plan) :].count("mechanism") == 1 and set(timed[-len(plan) :]) == {step.name for step in plan}


def test_a_step_waits_for_what_is_redone_behind_a_done_step(study, tmp_path):
    # calibration.json deleted, the caches made from it kept: the distilled student reads the
    # calibration, so it must wait for the calibration to be redone, not start beside it
    out = tmp_path / "s"
    shutil.copytree(study, out, ignore=shutil.ignore_patterns("mechanism.json", "infer.json"))
    (out / "recipes" / "calibration.json").unlink()
    shutil.rmtree(out / "runs" / "multi-agp")
    shutil.rmtree(out / "preds" / "multi-agp")
    plan = {step.name: step for step in runner.Study(out, TINY, echo=lambda _: None).plan(None)}
    assert "calibrate" in plan and not any(name.startswith("teacher cache") for name in plan)
    assert plan["calibrate"].needs == ()  # the pre-study it reads is done and nothing behind it is redone
    assert plan["train multi-agp/seed-0"].needs == ("calibrate",)
    assert plan["eval multi-agp/seed-0 test"].needs == ("train multi-agp/seed-0",)
    assert set(plan["mechanism"].needs) == {"train multi-agp/seed-0"}


def test_a_student_failing_in_a_job_is_recorded_and_its_evaluations_skipped(study, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(study, out, ignore=shutil.ignore_patterns("runs", "preds"))
    broken = runner.StudentRun(runner.Variant(name="broken", recipe="no-such-recipe"), 0, None)
    steps = [
        runner.Step("train broken/seed-0", "train_student", (broken,), row="broken/seed-0"),
        runner.Step(
            "eval broken/seed-0 val", "evaluate_students", ([broken], "val"), ("train broken/seed-0",), "broken/seed-0"
        ),
        runner.Step("eval majority val", "majority", ("val",)),
    ]
    runner.Study(out, TINY, jobs=2, echo=lambda _: None).execute(steps)
    failed = json.loads((out / "runs" / "broken" / "seed-0" / "failed.json").read_text())
    assert failed["error"].startswith("KeyError") and "no-such-recipe" in failed["error"]
    assert not (out / "preds" / "broken").exists()
    assert (out / "preds" / "majority" / "val.jsonl").is_file()
    # a step that is not a student's stops the study
    with pytest.raises(DriveKDError):
        runner.Study(out, TINY, jobs=2, echo=lambda _: None).execute(
            [runner.Step("eval teacher x", "evaluate_teacher", ("nope",))]
        )


def test_a_failure_that_is_not_a_students_lets_running_steps_finish_and_starts_nothing(study, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(study, out, ignore=shutil.ignore_patterns("preds", "timings.jsonl"))
    steps = [
        runner.Step("eval teacher nope", "evaluate_teacher", ("nope",)),  # fails at once: no such split
        runner.Step("eval teacher test", "evaluate_teacher", ("test",)),  # loads a model and decodes: slower
        runner.Step("eval majority val", "majority", ("val",)),
    ]
    with pytest.raises(DriveKDError, match="nope"):
        runner.Study(out, TINY, jobs=2, echo=lambda _: None).execute(steps)
    # the step that was running finished, kept its output and is recorded as done; nothing else started
    assert (out / "preds" / "teacher" / "test.jsonl").is_file()
    timed = [json.loads(x)["step"] for x in (out / "timings.jsonl").read_text().splitlines()]
    assert timed == ["eval teacher test"]
    assert not (out / "preds" / "majority").exists()


def test_study_jobs_draw_no_progress_bars_and_use_their_thread_share():
    import subprocess
    import sys

    code = (
        "from drivekd.study.runner import _worker_init\n"
        "_worker_init(1)\n"
        "import torch\n"
        "from tqdm import tqdm\n"
        "for _ in tqdm(range(3), desc='BAR', disable=False): pass\n"
        "print(torch.get_num_threads())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "1" and "BAR" not in r.stderr


def test_the_readme_example_trains_as_the_study_students_do():
    """One truth for how a student trains: the study's student.yaml, and the README's example config
    agrees with it on every field they share."""
    from drivekd.train.config import DistillConfig, load_config

    example = load_config(DistillConfig, Path(__file__).parents[1] / "configs" / "distill-tiny-internvl.yaml")
    for section, fields in runner.STUDENT.items():
        for key, value in fields.items():
            assert getattr(getattr(example, section), key) == value, (section, key)
    study = runner.Study(Path("unused"), TINY, workers=1, echo=lambda _: None)
    train = study.train_config(Path("o"), epochs=1.0, lr=1e-3, seed=0, eval_every=None)
    assert (train.micro_batch_size, train.weight_decay, train.save_every) == (8, 0.01, 100)
