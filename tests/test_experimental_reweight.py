"""Online loss reweighting, experimental: `drivekd experimental distill-reweight`."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from drivekd.cli import main
from drivekd.errors import DriveKDError
from drivekd.experimental.config import ReweightDistillConfig
from drivekd.experimental.reweight import LossReweighter, run_distill_reweight
from drivekd.train.config import DistillConfig, load_config

from .test_distill import _cfg, _metrics, _weighted_recipe, resume_is_bit_identical


def test_weights_move_toward_equal_gradient_shares_and_keep_their_sum():
    rw = LossReweighter({"ce": 1.0, "a": 1.0, "b": 1.0}, lr=0.05)
    for _ in range(50):
        rw.observe({"ce": 1.0, "a": 10.0, "b": 0.1}, {"ce": 1.0, "a": 1.0, "b": 1.0})
        stats = rw.step()
    w = rw.weights()
    assert sum(w.values()) == pytest.approx(3.0, rel=1e-6)
    assert w["a"] < 1.0 < w["b"]  # the loud gradient is turned down, the quiet one up
    assert w["ce"] >= 0.6
    assert set(stats) == {"weight/ce", "weight/a", "weight/b"}


def test_ce_floor_holds():
    rw = LossReweighter({"ce": 1.0, "a": 1.0}, lr=0.5, floor=0.6)
    for _ in range(100):
        rw.observe({"ce": 1000.0, "a": 0.001}, {"ce": 1.0, "a": 1.0})
        rw.step()
    assert rw.weights()["ce"] >= 0.6 - 1e-9


def _write(tmp_path, **fields):
    raw = {"model": {"name": "tiny-internvl-student"}, "data": {"path": "d"}, "train": {"output_dir": "o"}, **fields}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_the_section_its_shorthand_and_its_rules(tmp_path):
    c = load_config(ReweightDistillConfig, _write(tmp_path, teacher="T", reweight=True))
    assert (c.teacher.name, c.reweight.lr, c.combine.strategy) == ("T", 3e-4, "agp")
    # a section's field overridden on the command line, whichever form the file uses
    c = load_config(
        ReweightDistillConfig, _write(tmp_path, teacher="T", reweight=True), ["teacher.cache=C", "reweight.lr=0.1"]
    )
    assert (c.teacher.name, c.teacher.cache, c.reweight.lr) == ("T", "C", 0.1)
    assert (
        load_config(ReweightDistillConfig, _write(tmp_path, teacher="T")).reweight.alpha == 0.0
    )  # the section's defaults
    for fields, overrides, message in (
        ({}, ["combine.strategy=sum", "reweight=true"], r"reweight needs per-loss gradient norms"),
        ({"reweight": False}, [], r"this command reweights; for fixed weights run `drivekd distill`"),
        ({"reweight": {"enabled": True}}, [], r"`reweight.enabled` is gone: this command always reweights"),
    ):
        with pytest.raises(DriveKDError, match=message) as info:
            load_config(ReweightDistillConfig, _write(tmp_path, teacher="T", **fields), overrides)
        assert "\n" not in str(info.value)


def test_a_product_config_with_reweight_names_the_experimental_command(tmp_path):
    for fields, overrides, source in (
        ({"reweight": True}, [], "c.yaml"),
        ({"reweight": {"lr": 0.1}}, [], "c.yaml"),
        ({}, ["reweight.lr=0.1"], "override 'reweight.lr=0.1'"),
    ):
        file = _write(tmp_path, teacher="T", **fields)
        with pytest.raises(DriveKDError) as info:
            load_config(DistillConfig, file, overrides)
        assert str(info.value) == (
            f"{file if source == 'c.yaml' else source}: `reweight` moved to an experimental command: run "
            f"`drivekd experimental distill-reweight --config {file}`"
        )
    r = CliRunner().invoke(main, ["distill", "--config", str(_write(tmp_path, teacher="T", reweight=True))])
    assert r.exit_code == 2 and "drivekd experimental distill-reweight" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_product_does_not_import_the_experimental_package():
    code = (
        "import sys, drivekd.distill.run, drivekd.distill.calibrate, drivekd.train.sft; "
        "print(sorted(m for m in sys.modules if m.startswith('drivekd.experimental')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    product = Path(__file__).parents[1] / "drivekd"
    for folder in ("distill", "train"):
        for file in (product / folder).glob("*.py"):
            text = file.read_text(encoding="utf-8")
            assert "drivekd.experimental" not in text.replace("`drivekd.experimental`", ""), file
            assert "reweighting" not in text.lower() and "reweighter" not in text.lower(), file


@pytest.mark.integration
def test_online_reweighting_in_a_run(tmp_path, data_dir, teacher_dir):
    cfg = load_config(
        ReweightDistillConfig,
        _cfg(
            tmp_path,
            data_dir,
            teacher_dir,
            reweight={"lr": 0.05},
            recipe=_weighted_recipe(tmp_path, 1.0),  # the reweighter renormalises weights around 1
            data={"limit": 4},
            train={"max_steps": 3},
        ),
    )
    run_distill_reweight(cfg)
    rows = [m for m in _metrics(tmp_path / "run") if "weight/ce" in m]
    assert len(rows) == 3
    for r in rows:
        total = r["weight/ce"] + r["weight/perception"] + r["weight/reasoning"] + r["weight/planning"]
        assert total == pytest.approx(4.0, rel=1e-4) and r["weight/ce"] >= 0.6 - 1e-9
    with pytest.raises(DriveKDError, match="reweight needs"):  # a config-level rule: before any work
        load_config(
            ReweightDistillConfig,
            _cfg(tmp_path / "s", data_dir, teacher_dir, reweight=True, combine={"strategy": "sum"}),
        )


@pytest.mark.integration
def test_resume_is_bit_identical_with_the_reweighter_state(tmp_path, data_dir, teacher_dir, monkeypatch):
    """The reweighter's weights, AdamW state and pending statistics live in the checkpoint."""
    options = {"reweight": True, "recipe": _weighted_recipe(tmp_path, 1.0)}  # renormalised around 1
    resume_is_bit_identical(
        tmp_path, data_dir, teacher_dir, monkeypatch, options, ReweightDistillConfig, run_distill_reweight
    )
