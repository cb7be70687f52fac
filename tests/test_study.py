"""`drivekd reproduce`: a tiny end-to-end study, its resumption, refusal and failure handling."""

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import yaml

from drivekd.errors import DriveKDError
from drivekd.study import runner, students
from drivekd.study.profiles import PROFILES, VARIANTS, Profile, Variant, load_profile, load_variants
from drivekd.study.report import beyond_spread
from drivekd.study.runner import Chain, Step
from drivekd.study.students import StudentRun
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
        assert list(recipe) == [cap] and recipe[cap]["share"] == TINY.kd_share and "weight" not in recipe[cap]
    preds = [
        json.loads(x) for x in (study / "preds" / "single-teacher" / "seed-0" / "test.jsonl").read_text().splitlines()
    ]
    test = [json.loads(x) for x in (study / "data" / "test.jsonl").read_text().splitlines()]
    assert sorted(p["id"] for p in preds) == sorted(s["id"] for s in test)
    # every distillation run measured its own weights: weight x initial loss == share x CE
    cal = json.loads((study / "runs" / "multi-agp" / "seed-0" / "calibration.json").read_text())
    assert set(cal["weights"]) == {"perception", "reasoning", "planning"}
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
    from drivekd.distill.recipe import load_recipe

    for name, sig in load_recipe(str(study / "prestudy" / "recipe.yaml")).items():
        pairs = sig.pairs(4, 8)
        assert all(s < 3 for s, _ in pairs)
        assert f"{name}: {pairs[0][0]} <- " in line


def test_finished_runs_are_not_redone(study, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    for name in ("generate_data", "prestudy", "make_cache", "evaluate_students", "mechanism", "bench"):
        monkeypatch.setattr(runner.Study, name, boom)
    monkeypatch.setattr(students, "train", boom)
    runner.Study(study, TINY, echo=lambda _: None).run()


def test_failed_run_is_marked_and_the_study_goes_on(study, tmp_path, monkeypatch):
    out = tmp_path / "s"
    shutil.copytree(study, out, ignore=shutil.ignore_patterns("runs", "preds", "bench"))
    for keep in ("teacher", "majority"):
        shutil.copytree(study / "preds" / keep, out / "preds" / keep)
    original = students.train

    def dies_for_agp(configs, run):
        if run.variant.name == "multi-agp":
            raise RuntimeError("simulated out-of-memory")
        return original(configs, run)

    monkeypatch.setattr(students, "train", dies_for_agp)
    monkeypatch.setattr(runner.Study, "bench", lambda self: None)
    profile = TINY
    runner.Study(out, profile, echo=lambda _: None).run()
    rows = {v["name"]: v for v in json.loads((out / "results.json").read_text())["variants"]}
    assert rows["multi-agp"]["failed"] == [{"seed": 0, "error": "RuntimeError: simulated out-of-memory"}]
    assert rows["ce"]["average"] is not None  # the others still ran
    assert "simulated out-of-memory" in (out / "report.md").read_text()


def test_other_configuration_is_refused(study):
    other = TINY.model_copy(update={"student_lr": 1e-3})
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


def test_a_variants_mixing_reaches_its_distillation_config(study, tmp_path):
    variants = load_variants()
    assert variants["multi-agp"].definition()["mixing"] == "reference"
    assert variants["multi-agp-identity"].definition()["mixing"] == "identity"
    profile = TINY.model_copy(update={"variants": ("ce", "multi-agp", "multi-agp-identity", "multi-agp-uniform")})
    s = runner.Study(study, profile, echo=lambda _: None)  # its pre-study recipe
    mixing = {
        name: s.configs.config(StudentRun(variants[name], 0, None)).mixing
        for name in ("multi-agp", "multi-agp-identity", "multi-agp-uniform")
    }
    assert mixing == {
        "multi-agp": "reference",
        "multi-agp-identity": "identity",
        "multi-agp-uniform": [[1.0, 1.0, 1.0]] * 3,
    }
    bad = tmp_path / "variants.yaml"
    bad.write_text("x: {recipe: prestudy, mix: identity}\n")
    with pytest.raises(DriveKDError, match=r"variant 'x': unknown field `mix` \(did you mean `mixing`\?\)"):
        load_variants(bad)
    bad.write_text("x: {recipe: prestudy, mixing: identiy}\n")
    with pytest.raises(DriveKDError, match=r"variant 'x': mixing"):
        load_variants(bad)
    bad.write_text("x: {recipe: prestudy, amortize_every: 0}\n")
    with pytest.raises(DriveKDError, match=r"variant 'x': amortize_every: Input should be greater than or equal to 1"):
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
    monkeypatch.setattr(students, "train", lambda *a: (_ for _ in ()).throw(AssertionError("trained")))
    assert runner.Study(study, TINY, echo=lambda _: None).report() == study / "report.md"
    assert "| ce |" in (study / "report.md").read_text()


def test_a_data_seed_the_teacher_was_trained_on_is_refused(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "card.json").write_text(json.dumps({"seeds": [5, 101]}))
    profile = TINY.model_copy(update={"teacher": str(teacher)})
    with pytest.raises(DriveKDError, match=r"data seed 5 is one the teacher .* was trained on"):
        runner.Study(tmp_path / "s", profile).claim()
    reserved = TINY.model_copy(update={"data_seed": 150})
    with pytest.raises(DriveKDError, match="reserved for the shipped bases"):
        runner.Study(tmp_path / "s2", reserved).claim()
    assert not (tmp_path / "s").exists() and not (tmp_path / "s2").exists()


def test_a_study_begun_with_other_teacher_weights_is_refused(tmp_path):
    # the shipped teacher keeps its name when it is rebuilt; its card's hash tells the two apart
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    card = teacher / "card.json"
    card.write_text(json.dumps({"seeds": [101], "weights_sha256": "a" * 64}))
    profile = TINY.model_copy(update={"teacher": str(teacher)})
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
    assert [(c.name, c.after, [step.name for step in c.steps]) for c in plan] == [
        ("teacher", None, ["eval teacher test", "eval teacher test-other-images"]),
        ("majority", None, ["eval majority val", "eval majority test"]),
    ]
    before = len((out / "timings.jsonl").read_text().splitlines())
    s.run()
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
    timed = [json.loads(x)["step"] for x in (out / "timings.jsonl").read_text().splitlines()][before:]
    steps = [step.name for chain in plan for step in chain.steps]
    assert sorted(timed) == sorted([*steps, "mechanism", "report"])


def test_a_redone_prestudy_redoes_its_caches_and_the_distilled_students_wait_for_them(study, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(study, out, ignore=shutil.ignore_patterns("mechanism.json", "infer.json"))
    (out / "prestudy" / "recipe.yaml").unlink()
    shutil.rmtree(out / "runs" / "multi-agp")
    shutil.rmtree(out / "preds" / "multi-agp")
    shutil.rmtree(out / "preds" / "ce")
    plan = {chain.name: chain for chain in runner.Study(out, TINY, echo=lambda _: None).plan(None)}
    side = [step.name for step in plan[runner.TEACHER_SIDE].steps]
    assert side[0] == "prestudy"
    assert set(side[1:]) == {"teacher cache prestudy"} | {
        f"teacher cache prestudy-{cap}" for cap in ("perception", "reasoning", "planning")
    }
    assert plan["multi-agp/seed-0"].after == runner.TEACHER_SIDE
    assert plan["multi-agp/seed-0"].steps[0].name == "train multi-agp/seed-0"
    assert plan["ce/seed-0"].after is None  # reads no teacher: does not wait
    assert [step.name for step in plan["ce/seed-0"].steps] == [
        "eval ce/seed-0 val",
        "eval ce/seed-0 test",
        "eval ce/seed-0 test-other-images",
    ]


def test_a_student_failing_in_a_job_is_recorded_and_its_evaluations_skipped(study, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(study, out, ignore=shutil.ignore_patterns("runs", "preds"))
    s = runner.Study(out, TINY, jobs=2, echo=lambda _: None)
    broken = StudentRun(Variant(name="broken", recipe="no-such-recipe"), 0, None)
    chains = [
        Chain(
            "broken/seed-0",
            (
                Step("train broken/seed-0", partial(students.train, s.configs, broken)),
                Step("eval broken/seed-0 val", partial(s.evaluate_students, [broken], "val")),
            ),
            row="broken/seed-0",
        ),
        Chain("majority", (Step("eval majority val", partial(s.majority, "val")),)),
    ]
    s.execute(chains)
    failed = json.loads((out / "runs" / "broken" / "seed-0" / "failed.json").read_text())
    assert "no-such-recipe" in failed["error"]
    assert not (out / "preds" / "broken").exists()
    assert (out / "preds" / "majority" / "val.jsonl").is_file()
    # a chain that is not a student row's stops the study
    with pytest.raises(DriveKDError):
        s.execute([Chain("teacher", (Step("eval teacher x", partial(s.evaluate_teacher, "nope")),))])


def test_a_failure_that_is_not_a_students_lets_running_jobs_finish_and_starts_nothing(study, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(study, out, ignore=shutil.ignore_patterns("preds", "timings.jsonl"))
    s = runner.Study(out, TINY, jobs=2, echo=lambda _: None)
    chains = [
        Chain("nope", (Step("eval teacher nope", partial(s.evaluate_teacher, "nope")),)),  # fails at once
        Chain("teacher", (Step("eval teacher test", partial(s.evaluate_teacher, "test")),)),  # loads and decodes
        Chain("majority", (Step("eval majority val", partial(s.majority, "val")),)),
    ]
    with pytest.raises(DriveKDError, match="nope"):
        s.execute(chains)
    # the job that was running finished, kept its output and is recorded as done; nothing else started
    assert (out / "preds" / "teacher" / "test.jsonl").is_file()
    timed = [json.loads(x)["step"] for x in (out / "timings.jsonl").read_text().splitlines()]
    assert timed == ["eval teacher test"]
    assert not (out / "preds" / "majority").exists()


def test_study_jobs_draw_no_progress_bars_and_use_their_thread_share():
    import subprocess
    import sys

    code = (
        "from drivekd import progress\n"
        "for _ in progress.bar(range(3), desc='SHOWN', disable=False): pass\n"
        "from drivekd.study.runner import _worker_init\n"
        "_worker_init(1)\n"
        "import torch\n"
        "for _ in progress.bar(range(3), desc='HIDDEN', disable=False): pass\n"
        "from transformers.utils import logging\n"
        "assert not logging.is_progress_bar_enabled()\n"
        "print(torch.get_num_threads())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "1" and "SHOWN" in r.stderr and "HIDDEN" not in r.stderr


def test_the_readme_example_trains_as_the_study_students_do():
    """One truth for how a student trains: the study's student.yaml, and the README's example config
    agrees with it on every field they share."""
    from drivekd.train.config import DistillConfig, load_config

    example = load_config(DistillConfig, Path(__file__).parents[1] / "configs" / "distill-tiny-internvl.yaml")
    from drivekd.study.profiles import STUDENT

    for section, fields in STUDENT.items():
        for key, value in fields.items():
            assert getattr(getattr(example, section), key) == value, (section, key)
    study = runner.Study(Path("unused"), TINY, workers=1, echo=lambda _: None)
    train = study.configs.config(StudentRun(VARIANTS["ce"], 3, None)).train
    assert (train.micro_batch_size, train.weight_decay, train.save_every) == (8, 0.01, 100)
    assert (train.seed, train.lr, train.epochs, train.eval_every) == (3, TINY.student_lr, TINY.student_epochs, None)


def test_a_profile_file_extends_a_shipped_one_and_is_checked_when_read(tmp_path):
    file = tmp_path / "six-epochs.yaml"
    file.write_text("extends: quick\nstudent_epochs: 6\nseeds: [0, 1]\n")
    profile = load_profile(file)
    assert profile.name == "six-epochs" and profile.student_epochs == 6 and profile.seeds == (0, 1)
    assert profile.model_dump(exclude={"name", "student_epochs", "seeds"}) == PROFILES["quick"].model_dump(
        exclude={"name", "student_epochs", "seeds"}
    )
    for body, match in (
        ("student_lr: 0", "student_lr: Input should be greater than 0"),
        ("scenes: 2.5", "scenes: Input should be a valid integer"),
        ("variants: [ce, multi-agpp]", "variants: unknown variant 'multi-agpp' \\(did you mean 'multi-agp'\\?\\)"),
        ("split: [0.5, 0.5, 0.5]", "split: train, val and test fractions must be > 0 and sum to 1"),
        ("seeds: [0, 0]", "seeds: a seed is named twice"),
        ("student_lrr: 1", "unknown field `student_lrr` \\(did you mean `student_lr`\\?\\)"),
    ):
        file.write_text(f"extends: quick\n{body}\n")
        with pytest.raises(DriveKDError, match=f"{file}: six-epochs: {match}"):
            load_profile(file)
    with pytest.raises(DriveKDError, match="unknown profile 'nope'"):
        load_profile("nope")


def test_a_students_config_file_trains_it_by_hand(study, tmp_path):
    """The study's own config file is a `drivekd distill` config: the same run, resumed, has nothing to do."""
    config = study / "runs" / "multi-agp" / "seed-0" / "config.yaml"
    text = config.read_text()
    assert str(study / "data") in text and "share" not in text  # absolute paths; shares live in the recipe
    r = run_cli("distill", "--config", str(config), "--resume")
    assert r.returncode == 0, r.stderr
    assert "nothing to do" in (r.stdout + r.stderr)


def test_the_mechanism_table_takes_the_first_seeds_students_exactly():
    from drivekd.study.report import _mechanism

    variants = [{"name": "ce", "average": 30.0, "other_images_average": 29.0}]
    mechanism = {"ce/seed-1": {"mean_ratio": 2.0}, "ce/seed-11": {"mean_ratio": 9.0}, "teacher": {"mean_ratio": 3.0}}
    table = "\n".join(_mechanism(variants, mechanism, first_seed=1))
    row = next(line for line in table.splitlines() if line.startswith("| ce |"))
    assert row.endswith("| 2.00 |") and "9.00" not in table  # seed-11 ends like seed-1 and is not it
