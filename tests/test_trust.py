"""A wrong input, value or default never becomes a number: every number has a domain, every name is
checked against what exists, a cache or a run is refused for another identity, metrics are defined
once, and a recipe's loss weights are measured in every run rather than left at a meaningless 1."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from drivekd.cli import main
from drivekd.data.drivesim.generate import GenerateConfig, generate
from drivekd.distill.engine import Distiller
from drivekd.distill.recipe import SignalSpec, check_recipe, load_recipe
from drivekd.distill.run import run_cache_teacher, run_distill
from drivekd.errors import DriveKDError
from drivekd.experimental.config import CONFIGS as EXPERIMENTAL
from drivekd.models.loading import PRESETS
from drivekd.study.bases import DatasetSpec, load_builds
from drivekd.study.profiles import Profile, Variant, load_profile, load_variants
from drivekd.train.config import CONFIGS, DistillConfig, SFTConfig, TrainConfig, load_config
from drivekd.train.run_folder import RunFolder
from drivekd.train.sft import answer_metrics, load_model, load_training_data, run_sft
from drivekd.train.trainer import Trainer

from .conftest import run_cli


# ---- every number has a domain --------------------------------------------------------------------
def _bounds(metadata: list[Any]) -> dict[str, float]:
    out = {}
    for m in metadata:
        for inner in m.metadata if isinstance(m, FieldInfo) else [m]:
            for key in ("ge", "gt", "le", "lt"):
                if getattr(inner, key, None) is not None:
                    out[key] = getattr(inner, key)
    return out


def numeric_fields(cls: type[BaseModel], path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], type, dict]]:
    """(path, int or float, bounds) of every number a config class holds, sections, lists of
    sections and tuples walked."""
    found = []

    def visit(annotation: Any, metadata: list[Any], at: tuple[Any, ...]) -> None:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is Annotated:
            visit(args[0], [*args[1:], *metadata], at)
        elif origin in (typing.Union, types.UnionType):
            for a in args:
                if a is not type(None):
                    visit(a, metadata, at)
        elif origin is tuple:
            for i, a in enumerate(args):
                visit(a, [], (*at, i))
        elif origin is list:
            visit(args[0], [], (*at, 0))
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.extend(numeric_fields(annotation, at))
        elif annotation in (int, float):
            found.append((at, annotation, _bounds(metadata)))

    for name, info in cls.model_fields.items():
        visit(info.annotation, list(info.metadata), (*path, name))
    return found


CLASSES = {**CONFIGS, **EXPERIMENTAL, "recipe signal": SignalSpec}
# the study's own files: profiles, variants, the bases' datasets
STUDY_FILES = {"study profile": Profile, "study variant": Variant, "base dataset": DatasetSpec}
# of an experimental config, the fields its product config lacks
FIELDS = [
    (kind, f)
    for kind, cls in CLASSES.items()
    for f in numeric_fields(cls)
    if kind not in EXPERIMENTAL or f[0][0] not in next(c for c in CONFIGS.values() if issubclass(cls, c)).model_fields
]


def test_every_numeric_field_declares_its_domain():
    assert len(FIELDS) > 30
    study = [(kind, f) for kind, cls in STUDY_FILES.items() for f in numeric_fields(cls)]
    assert len(study) > 10
    undeclared = [".".join(map(str, path)) for _, (path, _, bounds) in FIELDS + study if not bounds]
    # a new number without a domain (drivekd/domains.py) fails here; mixing entries are the one list
    assert undeclared == ["mixing.0.0"] or undeclared == [], undeclared


def _base_raw(kind: str) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "model": {"name": "tiny-internvl-student"},
        "data": {"path": "d"},
        "train": {"output_dir": "o"},
    }
    return {**raw, "teacher": "T"} if "distill" in kind else raw


def _set(raw: dict[str, Any], path: tuple[Any, ...], value: Any, fill: Any = 0.5) -> None:
    """Set `raw` at `path` to `value`, creating what is missing (list places before it: `fill`)."""
    node: Any = raw
    for key, nxt in itertools.pairwise(path):
        if isinstance(node, dict) and key not in node:
            node[key] = [] if isinstance(nxt, int) else {}
        if isinstance(node, list):
            while len(node) <= key:
                node.append({"path": "m"} if isinstance(nxt, str) else [0.9, 0.999])
        node = node[key]
    if isinstance(node, list):
        while len(node) <= path[-1]:
            node.append(fill)
    node[path[-1]] = value


def _outside(kind: type, bounds: dict[str, float]) -> st.SearchStrategy:
    """Values a field of this type and domain must refuse."""
    options: list[st.SearchStrategy] = [st.just(True), st.just("3"), st.just([1])]
    if kind is int:
        options.append(st.just(2.5))
    else:
        options += [st.just(math.nan), st.just(math.inf)]
    number = st.integers if kind is int else st.floats
    step = 1 if kind is int else 1e-9
    if "ge" in bounds:
        options.append(number(max_value=bounds["ge"] - step, min_value=-(10**9)))
    if "gt" in bounds:
        options.append(number(max_value=bounds["gt"], min_value=-(10**9)))
    if "le" in bounds:
        options.append(number(min_value=bounds["le"] + step, max_value=10**9))
    if "lt" in bounds:
        options.append(number(min_value=bounds["lt"], max_value=10**9))
    return st.one_of(options)


@pytest.mark.parametrize(
    ("kind", "field"), FIELDS, ids=lambda f: ".".join(map(str, f[0])) if isinstance(f, tuple) else f
)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_value_outside_its_domain_is_a_one_line_error_naming_the_field(tmp_path, kind, field, data):
    path, number_type, bounds = field
    if not bounds:
        return  # the mixing matrix: checked where it is built (entries >= 0, rows by capability)
    bad = data.draw(_outside(number_type, bounds))
    where = ".".join(map(str, path))
    if kind == "recipe signal":
        entry: dict[str, Any] = {"kind": "attn_tv" if path[0] != "temperature" else "logit_kl"}
        _set(entry, path, bad, fill=0 if number_type is int else 0.5)
        file = tmp_path / "recipe.yaml"
        file.write_text(yaml.safe_dump({"perception": entry}))
        with pytest.raises(DriveKDError, match=rf"signal 'perception': {where}: ") as info:
            load_recipe(str(file))
    else:
        raw = _base_raw(kind)
        _set(raw, path, bad, fill=0 if number_type is int else 0.5)
        file = tmp_path / "c.yaml"
        file.write_text(yaml.safe_dump(raw))
        with pytest.raises(DriveKDError, match=rf"c.yaml: {where}: ") as info:
            load_config(CLASSES[kind], file)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kind", "field"),
    [(kind, f) for kind, cls in STUDY_FILES.items() for f in numeric_fields(cls)],
    ids=lambda f: ".".join(map(str, f[0])) if isinstance(f, tuple) else f,
)
def test_a_study_file_value_outside_its_domain_is_a_one_line_error_naming_it(tmp_path, kind, field):
    path, _, bounds = field
    bad = bounds["ge"] - 1 if "ge" in bounds else bounds.get("gt", 0) - 1
    file = tmp_path / "f.yaml"
    if kind == "study profile":
        raw: dict[str, Any] = {"extends": "quick"}
        _set(raw, path, bad if path[0] != "split" else 2.0)
        file.write_text(yaml.safe_dump(raw))
        with pytest.raises(DriveKDError, match=rf"f.yaml: f: {path[0]}") as info:
            load_profile(file)
    elif kind == "study variant":
        file.write_text(yaml.safe_dump({"v": {"recipe": "prestudy", path[0]: bad}}))
        with pytest.raises(DriveKDError, match=rf"variant 'v': {path[0]}: ") as info:
            load_variants(file)
    else:
        dataset = {"task": "qa", "scenes": 3, "seed": 150}
        _set(dataset, path, bad)
        stage = {"model": {"name": "tiny-internvl-student"}, "data": {"path": "@d"}, "train": {}}
        build = {"preset": "p", "about": "a", "datasets": {"d": dataset}, "stages": {"s": stage}}
        file.write_text(yaml.safe_dump({"b": {**build, "evaluate": "d", "check": "d"}}))
        with pytest.raises(DriveKDError, match=rf"f.yaml: b: dataset d: {path[0]}") as info:
            load_builds(file)
    assert "\n" not in str(info.value)


def test_nonsense_numbers_exit_2_before_anything_loads(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**_base_raw("sft"), "train": {"output_dir": str(tmp_path / "run")}}))
    for override, field in (
        ("train.grad_accum=0", "train.grad_accum"),
        ("train.max_steps=-3", "train.max_steps"),
        ("train.warmup_steps=-5", "train.warmup_steps"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.log_every=0", "train.log_every"),
        ("train.lr=-1", "train.lr"),
        ("train.keep_last=0", "train.keep_last"),
    ):
        r = CliRunner().invoke(main, ["sft", "--config", str(config), override])
        assert r.exit_code == 2, r.output
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and f"'{override}': {field}: " in r.stderr
    r = run_cli("sft", "--config", str(config), "train.grad_accum=0")  # as a user runs it: no traceback
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    c = tmp_path / "d.yaml"
    c.write_text(yaml.safe_dump({**_base_raw("distill"), "train": {"output_dir": "o", "tag_attention_weight": 1.0}}))
    with pytest.raises(DriveKDError, match=r"`train.tag_attention_weight` is an SFT loss .*a distillation run has no"):
        load_config(DistillConfig, c)  # it was silently ignored
    cached = {**_base_raw("distill"), "teacher": {"name": "T", "cache": "C"}}
    c.write_text(yaml.safe_dump({**cached, "train": {"output_dir": "o", "val_other_images": True}}))
    with pytest.raises(DriveKDError, match="cached targets belong to each sample's own images"):
        load_config(DistillConfig, c)
    c.write_text(yaml.safe_dump({**_base_raw("distill"), "ce_weight": -1}))
    with pytest.raises(DriveKDError, match="ce_weight: Input should be greater than or equal to 0"):
        load_config(DistillConfig, c)


# ---- names are checked against what exists ---------------------------------------------------------
def _recipe(tmp_path: Path, text: str) -> str:
    file = tmp_path / "r.yaml"
    file.write_text(text)
    return str(file)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("perception: {kind: attn_tv, wieght: 3}\n", r"unknown field 'wieght' \(did you mean 'weight'\?\)"),
        ("planing: {kind: attn_tv, layer: -2}\n", r"'planing'.* not a capability .*\(did you mean 'planning'\?\)"),
        ("kd: {kind: logit_kl}\n", r"'kd'.* not a capability"),
        ("", r"the recipe has no signals"),
        ("{}\n", r"the recipe has no signals"),
        ("perception: {kind: attn_tv, weight: 2, share: 0.1}\n", r"give weight or share, not both"),
        (
            "perception: {kind: attn_tv, capability: planning}\n",
            r"named after perception but given `capability: planning`",
        ),
        ("perception: {kind: attn_tv}\nperception: {kind: hidden}\n", r"key 'perception' given twice"),
        ("perception: {kind: attn_tv, layer: true}\n", r"layer: Input should be a valid integer"),
    ],
)
def test_recipe_mistakes_are_named(tmp_path, text, message):
    with pytest.raises(DriveKDError, match=message) as info:
        load_recipe(_recipe(tmp_path, text))
    assert "\n" not in str(info.value)


def test_capabilities_of_signals_and_their_aliases(tmp_path):
    signals = load_recipe(
        _recipe(
            tmp_path,
            "plan: {kind: attn_tv, layer: -2}\nkd: {kind: logit_kl, capability: all}\n"
            "extra: {kind: hidden, capability: Prediction}\n",
        )
    )
    assert {n: s.capability for n, s in signals.items()} == {"plan": "planning", "kd": "all", "extra": "reasoning"}
    assert load_recipe("ce") == {}  # the cross-entropy baseline, asked for by name
    raw = {**_base_raw("distill"), "data": {"path": "d", "capability": "plan"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(DistillConfig, tmp_path / "c.yaml").data.capability == "planning"


@pytest.mark.parametrize("recipe", ["drive-kd", "ce-kl", "ce-hidden", "drive-kd-cosine"])
def test_a_signal_written_back_as_a_recipe_entry_loads_as_itself(tmp_path, recipe):
    signals = load_recipe(recipe)
    file = tmp_path / "again.yaml"
    file.write_text(yaml.safe_dump({n: s.recipe_entry() for n, s in signals.items()}))
    assert load_recipe(str(file)) == signals


def test_numbers_written_as_users_write_them(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; strict numeric fields would refuse the help's own example
    raw = {**_base_raw("sft"), "train": {"output_dir": "o", "lr": "PLACEHOLDER"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw).replace("PLACEHOLDER", "1e-4"))
    assert load_config(SFTConfig, tmp_path / "c.yaml").train.lr == 1e-4
    assert load_config(SFTConfig, tmp_path / "c.yaml", ["train.lr=5E-3"]).train.lr == 5e-3
    assert load_recipe(_recipe(tmp_path, "perception: {kind: attn_tv, share: 5e-2}\n"))["perception"].share == 0.05


def test_per_signal_teachers_must_name_signals_of_the_recipe(tmp_path):
    raw = {**_base_raw("distill"), "teacher": {"name": "tiny-internvl-teacher", "per_signal": {"percepton": "x"}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(
        DriveKDError, match=r"teacher.per_signal.percepton: .* no signal 'percepton' \(did you mean 'perception'\?\)"
    ):
        check_recipe(load_config(DistillConfig, tmp_path / "c.yaml"))


# ---- one identity for a cache and a run ------------------------------------------------------------
def _distill_cfg(tmp_path: Path, data_dir: Path, teacher: Path, **over: Any) -> DistillConfig:
    raw: dict[str, Any] = {
        "model": {"name": "tiny-internvl-student"},
        "teacher": str(teacher),
        "data": {"path": str(data_dir), "limit": 8},
        "train": {"output_dir": str(tmp_path / "run"), "micro_batch_size": 4, "max_steps": 2, "log_every": 1},
    }
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(raw.get(k), dict) else v
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    return load_config(DistillConfig, tmp_path / "c.yaml")


def test_a_cache_made_for_a_student_of_another_depth_is_refused(tmp_path, data_dir, teacher_dir, monkeypatch):
    monkeypatch.setitem(
        PRESETS,
        "tiny-internvl-student-2",
        {**PRESETS["tiny-internvl-student"], "text": {"hidden": 128, "layers": 2, "heads": 2}},
    )
    cfg = _distill_cfg(tmp_path, data_dir, teacher_dir, data={"limit": 4})
    cache = run_cache_teacher(cfg, tmp_path / "cache")
    shallow = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"name": "tiny-internvl-student-2"}),
            "teacher": cfg.teacher.model_copy(update={"cache": str(cache)}),
        }
    )
    student = load_model(shallow.model)
    train, val, _ = load_training_data(shallow.data, student)
    with pytest.raises(DriveKDError, match=r"cache was made for a 4-layer student, this run's has 2 layers"):
        Distiller(shallow, student, train + val)
    # targets of a float32 teacher are not a bfloat16 run's
    bf16 = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"cache": str(cache), "dtype": "bfloat16"})})
    student = load_model(cfg.model)
    with pytest.raises(DriveKDError, match="cache was made for a different teacher"):
        Distiller(bf16, student, load_training_data(cfg.data, student)[0])
    # the binding is what is identified: the 2-layer student's reasoning windows differ from the 4-layer one's
    reasoning = load_recipe("drive-kd")["reasoning"]
    assert reasoning.bind("s", 2, 8).identity() != reasoning.bind("s", 4, 8).identity()


def test_resume_refuses_a_changed_run_and_a_finished_run_is_a_no_op(tmp_path, data_dir):
    def config(*overrides: str) -> SFTConfig:
        raw = {
            "model": {"name": "tiny-internvl-student"},
            "data": {"path": str(data_dir), "limit": 8},
            "train": {
                "output_dir": str(tmp_path / "run"),
                "micro_batch_size": 4,
                "max_steps": 2,
                "save_every": 1,
                "log_every": 1,
                "lr": 1e-3,
            },
        }
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
        return load_config(SFTConfig, tmp_path / "c.yaml", list(overrides))

    run_sft(config())
    run = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    log = (run / "metrics.jsonl").read_text()
    # a finished run resumed unchanged: nothing to do, nothing written (it appended a val line before)
    assert run_sft(config(), resume=True) == run / "final"
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before and (run / "metrics.jsonl").read_text() == log
    for override, diff in (("train.lr=0.5", "train.lr: 0.001 -> 0.5"), (f"data.path={tmp_path}", "data.path: ")):
        with pytest.raises(DriveKDError, match=rf"--resume with a config that changes the run \({diff}"):
            run_sft(config(override), resume=True)
    with pytest.raises(DriveKDError, match=r"may extend train.max_steps \(2\), not shrink it to 1"):
        run_sft(config("train.max_steps=1"), resume=True)
    # watching or keeping the run differently is not a change, nor is epochs while max_steps decides
    assert run_sft(config("train.keep_last=5"), resume=True) == run / "final"
    assert run_sft(config("train.epochs=7"), resume=True) == run / "final"
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    # the same config over other data at the same path is refused once the data is read
    moved = tmp_path / "data-was-here"
    data_dir.rename(moved)
    try:
        generate(data_dir, GenerateConfig(scenes=3, seed=22))
        with pytest.raises(DriveKDError, match="--resume with other data than the run was started with"):
            run_sft(config("train.max_steps=3"), resume=True)
    finally:
        import shutil

        shutil.rmtree(data_dir)
        moved.rename(data_dir)
    # more steps continue it
    run_sft(config("train.max_steps=3"), resume=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3 and yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 3


def test_run_identity_is_what_the_run_is_not_where_it_is_written(tmp_path, monkeypatch):
    from drivekd.train.run_folder import run_identity

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    a = load_config_sft(Path("data")).model_copy(update={"train": TrainConfig(output_dir="runs/a")})
    b = load_config_sft(tmp_path / "data").model_copy(update={"train": TrainConfig(output_dir="/elsewhere/b")})
    assert run_identity(a) == run_identity(b)  # a relative and an absolute path to one dataset; a moved run
    assert run_identity(a)["named.world_size"] == 1
    monkeypatch.setenv("WORLD_SIZE", "4")  # 4 processes: another global batch, other samples per rank
    assert run_identity(a)["named.world_size"] == 4


def test_run_identity_includes_what_the_config_only_names(tmp_path):
    folder = RunFolder(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "step-0000001").mkdir(parents=True)
    folder.record({"train.lr": 0.1, "named.recipe.perception.layer": 0})
    with pytest.raises(DriveKDError, match=r"named.recipe.perception.layer: 0 -> 1"):
        folder.check({"train.lr": 0.1, "named.recipe.perception.layer": 1}, resume=True)
    assert folder.check({"train.lr": 0.1, "named.recipe.perception.layer": 0}, resume=True)
    (tmp_path / "run" / "run.json").write_text(json.dumps({"identity": {"train.lr": 0.1}}))  # before versions
    with pytest.raises(DriveKDError, match="written by an older drivekd"):
        folder.check({"train.lr": 0.1}, resume=True)


# ---- metrics are defined once ----------------------------------------------------------------------
def test_val_ce_is_the_token_mean_over_the_set_whatever_the_batch_size(data_dir):
    from drivekd.train.sft import token_nll

    backend = load_model(load_config_sft(data_dir).model)
    val = load_training_data(load_config_sft(data_dir).data, backend)[1]
    assert len(val) >= 5
    # DriveLM-like mixes: answers without a `Final: {...}` span (open-ended) beside ones with it
    val = [*val[:2], *(dataclasses.replace(s, id=f"open-{s.id}", answer="Keep going.") for s in val[:3]), *val[2:]]
    figures = {}
    for size in (1, 2, 3, 8):
        cfg = TrainConfig(output_dir="unused", micro_batch_size=size, val_max_samples=64)
        figures[size] = Trainer(cfg, backend, val[:1], val, answer_metrics).validate()
    with torch.no_grad():  # the definitions: every answer token weighs the same; every answer with a span
        total, count, hits, spans = 0.0, 0, 0.0, 0
        for s in val:
            batch = backend.build_batch([s])
            nll, labels = token_nll(backend.model, batch)
            total, count = total + float(nll.sum()), count + int((labels != -100).sum())
            if batch.decision_mask is not None and bool(batch.decision_mask.any()):
                hits, spans = hits + float(answer_metrics(backend.model, batch)["decision_acc"][0]), spans + 1
    assert 0 < spans < len(val)  # answers with and without a `Final:` span: a batch mixes them
    for size, value in figures.items():
        assert value["val_ce"] == pytest.approx(total / count, rel=2e-5), (size, figures)
        assert value["val_decision_acc"] == pytest.approx(hits / spans, abs=1e-9), (size, figures)


def load_config_sft(data_dir: Path) -> SFTConfig:
    return SFTConfig(
        model={"name": "tiny-internvl-student"}, data={"path": str(data_dir)}, train={"output_dir": "unused"}
    )


@pytest.mark.integration
def test_the_last_validation_is_logged_once(tmp_path, data_dir):
    cfg = load_config_sft(data_dir).model_copy(
        update={"train": TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, eval_every=2, micro_batch_size=4)}
    )
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"limit": 8})})
    run_sft(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "val_ce" in m] == [2]


# ---- loss weights as shares, measured in every run -------------------------------------------------
def test_calibration_measures_a_random_sample_of_the_training_data(data_dir):
    from drivekd.train.order import calibration_sample

    backend = load_model(load_config_sft(data_dir).model)
    train = load_training_data(load_config_sft(data_dir).data, backend)[0]
    by_capability = sorted(train, key=lambda s: s.capability)  # a file sorted by capability
    for grouped in (False, True):  # length-grouped batches are length-uniform: not a fair sample either
        cfg = TrainConfig(output_dir="unused", micro_batch_size=2, group_by_length=grouped, seed=3)
        picked = calibration_sample(by_capability, cfg, batches=2)
        assert len(picked) == 4 and picked == calibration_sample(by_capability, cfg, batches=2)  # every rank alike
        assert picked != by_capability[:4] and len({s.capability for s in picked}) > 1
        assert picked == [
            by_capability[i]
            for i in Trainer(
                cfg.model_copy(update={"group_by_length": False}), backend, by_capability, [], answer_metrics
            ).epoch_order(0)[:4]
        ]


@pytest.mark.integration
def test_every_run_calibrates_its_shares_and_a_resume_reads_them(tmp_path, data_dir, teacher_dir, capfd):
    cfg = _distill_cfg(
        tmp_path,
        data_dir,
        teacher_dir,
        recipe=_recipe(
            tmp_path,
            "perception: {kind: attn_tv, layer: 0}\nreasoning: {kind: attn_group, layers: [0, -2], share: 0.3}\n"
            "planning: {kind: attn_tv, layer: -2, weight: 1.0}\n",
        ),
    )
    run_distill(cfg)
    run = tmp_path / "run"
    record = json.loads((run / "calibration.json").read_text())
    assert record["shares"] == {"perception": 0.1, "reasoning": 0.3}  # the default share, an explicit one
    losses, weights = record["initial_losses"], record["weights"]
    for name, share in record["shares"].items():
        assert weights[name] * losses[name] == pytest.approx(share * losses["ce"], rel=1e-5)
    assert weights["planning"] == 1.0 and weights["perception"] > 1e3  # maps are tiny at weight 1
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["loss_weight/perception"] == weights["perception"] and lines[0]["share/reasoning"] == 0.3
    first = next(m for m in lines if m["step"] == 1 and "perception" in m)
    for name, share in record["shares"].items():  # step 1 trains at about its share (another batch)
        assert 0.2 * share < first[name] / first["ce"] < 5 * share, (name, first)
    err = capfd.readouterr().err
    # an absolute weight of 1 leaves an attention signal at ~1e-7 of the CE: one warning, once
    assert err.count("signal 'planning': its weighted loss stayed below 0.001 x CE") == 0  # only 2 steps so far
    cfg10 = _distill_cfg(
        tmp_path / "w", data_dir, teacher_dir, recipe=cfg.recipe, train={"max_steps": 10, "log_every": 5}
    )
    run_distill(cfg10)
    err = capfd.readouterr().err
    assert err.count("signal 'planning': its weighted loss stayed below 0.001 x CE") == 1
    assert "signal 'perception': its weighted" not in err


def test_an_abandoned_temporary_folder_is_removed_by_the_next_writer(tmp_path):
    from drivekd.atomic import _HOST, atomic_dir

    dead = tmp_path / f".cache.{2**22 + 12345}@{_HOST}.x1.tmp"  # a pid above the kernel's limit: no such process
    dead.mkdir()
    live = tmp_path / f".cache.{os.getpid()}@{_HOST}.x2.tmp"
    live.mkdir()
    other_host = tmp_path / f".cache.{2**22 + 12345}@elsewhere.x3.tmp"
    other_host.mkdir()
    with atomic_dir(tmp_path / "cache") as tmp:
        (tmp / "a").write_text("1")
    assert not dead.exists() and live.exists() and other_host.exists() and (tmp_path / "cache" / "a").is_file()
