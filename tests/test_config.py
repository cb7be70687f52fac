"""Configs: every field documented where users look, old field places named, cross-field rules up front."""

import pytest
import yaml
from click.testing import CliRunner

from drivekd.cli import main
from drivekd.errors import DriveKDError
from drivekd.experimental.config import CONFIGS as EXPERIMENTAL
from drivekd.train.config import CONFIGS, DistillConfig, describe, load_config


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_every_field_has_help_and_reaches_the_cli(kind):
    rows = describe(CONFIGS[kind])
    assert len(rows) > 30
    assert [key for key, _, _, description in rows if not description] == []
    shown = CliRunner().invoke(main, ["config", "show", kind])
    assert shown.exit_code == 0
    command = {"sft": "sft", "distill": "distill"}[kind]
    helped = CliRunner().invoke(main, [command, "--help"])
    for key, *_ in rows:
        assert f"  {key}" in shown.output and f"  {key}" in helped.output, key
    # what moved to `drivekd experimental` is no field of a product config
    assert not [key for key, *_ in rows if key.startswith("reweight") or "tag_attention" in key]


@pytest.mark.parametrize("command", sorted(EXPERIMENTAL))
def test_every_experimental_field_has_help_and_reaches_its_command(command):
    rows = describe(EXPERIMENTAL[command])
    assert [key for key, _, _, description in rows if not description] == []
    helped = CliRunner().invoke(main, ["experimental", command, "--help"])
    assert helped.exit_code == 0
    for key, *_ in rows:
        assert f"  {key}" in helped.output, key


def _write(tmp_path, **fields):
    raw = {"model": {"name": "tiny-internvl-student"}, "data": {"path": "d"}, "train": {"output_dir": "o"}, **fields}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_sections_and_their_shorthands(tmp_path):
    c = load_config(DistillConfig, _write(tmp_path, teacher="T"))
    assert (c.teacher.name, c.combine.strategy) == ("T", "agp")
    c = load_config(DistillConfig, _write(tmp_path, teacher={"name": "T", "per_signal": {"planning": "P"}}))
    assert (c.teacher.of("planning"), c.teacher.of("perception")) == ("P", "T")
    # a section's field overridden on the command line, whichever form the file uses
    c = load_config(DistillConfig, _write(tmp_path, teacher="T"), ["teacher.cache=C", "combine.project_per=step"])
    assert (c.teacher.name, c.teacher.cache, c.combine.project_per) == ("T", "C", "step")


@pytest.mark.parametrize(
    ("fields", "overrides", "message"),
    [
        ({"strategy": "sum"}, [], r"c.yaml: unknown field `strategy`"),
        ({"trian": {"output_dir": "o"}}, [], r"c.yaml: unknown field `trian` \(did you mean `train`\?\)"),
        ({}, ["train.lrr=0.1"], r"override 'train.lrr=0.1': unknown field `train.lrr` \(did you mean `train.lr`\?\)"),
        ({}, ["reweight=true"], r"override 'reweight=true': `reweight` moved to an experimental command: run "),
        ({"data": {"path": "d", "shuffle_choices": True}, "teacher": {"cache": "x"}}, [], "shuffle_choices with"),
        ({"combine": {"amortize_every": 0}}, [], "combine.amortize_every: Input should be greater than or equal to 1"),
        ({"combine": {"strategy": "agp2"}}, [], r"combine.strategy: Input should be"),
    ],
)
def test_config_mistakes_are_one_line_errors(tmp_path, fields, overrides, message):
    with pytest.raises(DriveKDError, match=message) as info:
        load_config(DistillConfig, _write(tmp_path, **fields), overrides)
    assert "\n" not in str(info.value)
