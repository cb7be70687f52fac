import json
from pathlib import Path

import pytest
import torch
import yaml

from drivekd.data.formats import load_split
from drivekd.distill.recipe import load_recipe, mixing_matrix
from drivekd.distill.run import run_distill
from drivekd.errors import DriveKDError
from drivekd.models.capture import capture, text_rows
from drivekd.models.loading import LoadOptions, load_backend
from drivekd.train.config import DistillConfig, load_config

from .conftest import run_torchrun


@pytest.mark.parametrize("name", ["tiny-internvl-teacher", "tiny-qwen25vl-student"])
def test_capture_equals_eager_attention_with_padding(name, data_dir):
    samples = load_split(data_dir, "train")[:3]
    backend = load_backend(name)
    backend.model.eval()
    batch = backend.build_batch(samples)
    valid = batch.inputs["attention_mask"].bool()
    assert not valid.all(), "the batch must contain padding"
    with torch.no_grad():
        backend.set_attention("eager")
        ref = backend.model(**batch.inputs, output_attentions=True)
        backend.set_attention("sdpa")
        with capture(backend, [0, -2]) as maps:
            out = backend.model(**batch.inputs)
    last = backend.num_layers - 2
    assert sorted(maps) == [0, last]
    rows = valid[:, :, None].expand(-1, -1, valid.shape[1])
    for layer in (0, last):
        want = ref.attentions[layer].mean(1)
        assert (maps[layer] - want)[rows].abs().max() < 1e-5
        assert maps[layer][rows & ~valid[:, None, :].expand_as(rows)].abs().max() == 0  # padding keys get nothing
    assert torch.allclose(out.logits, ref.logits, atol=1e-4)
    assert backend.model.config.text_config._attn_implementation == "sdpa"  # restored


def test_text_rows_are_each_samples_text_positions_in_order():
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    visual = torch.tensor([[0, 1, 1, 0, 0, 1], [0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    index, valid = text_rows(attention, visual)
    for b in range(3):
        want = [t for t in range(6) if attention[b, t] and not visual[b, t]]
        assert index[b, valid[b]].tolist() == want
        assert int(valid[b].sum()) == len(want)
    assert index.shape == (3, 3)


@pytest.mark.parametrize("name", ["tiny-internvl-student", "tiny-qwen25vl-student"])
def test_text_row_capture_equals_the_eager_maps_rows_and_their_gradients(name, data_dir):
    # text->vision signals capture only the text rows; values and gradients must be the whole map's rows
    backend = load_backend(name)
    backend.model.eval()
    batch = backend.build_batch(load_split(data_dir, "train")[:3])
    index, valid = text_rows(batch.inputs["attention_mask"], batch.visual_mask)
    assert index.shape[1] < batch.inputs["input_ids"].shape[1]  # fewer rows than positions
    with torch.no_grad():
        backend.set_attention("eager")
        eager = backend.model(**batch.inputs, output_attentions=True).attentions
        backend.set_attention("sdpa")
    layers = [0, backend.num_layers - 1]
    weights = torch.rand(index.shape[0], index.shape[1], batch.inputs["input_ids"].shape[1])
    grads = {}
    for mode in ("rows", "full"):
        backend.model.zero_grad(set_to_none=True)
        kwargs = {"row_layers": layers, "row_index": index} if mode == "rows" else {}
        with capture(backend, [] if mode == "rows" else layers, **kwargs) as maps:
            backend.model(**batch.inputs)
        got = {
            i: maps.rows[i] if mode == "rows" else maps[i].gather(1, index[:, :, None].expand(-1, -1, maps[i].shape[2]))
            for i in layers
        }
        for i in layers:
            want = eager[i].mean(1).gather(1, index[:, :, None].expand(-1, -1, eager[i].shape[2]))
            assert got[i].shape == want.shape
            assert (got[i] - want)[valid].abs().max() < 1e-5
        sum((got[i] * weights).sum() for i in layers).backward()
        grads[mode] = [p.grad.clone() for p in backend.model.model.language_model.layers[0].parameters()]
        if mode == "rows":
            assert not maps  # no whole map was kept
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(grads["rows"], grads["full"], strict=True))


def test_capture_keeps_gradients_for_the_student(data_dir):
    backend = load_backend("tiny-internvl-student")
    backend.model.eval()
    batch = backend.build_batch(load_split(data_dir, "train")[:2])
    with capture(backend, [1]) as maps:
        backend.model(**batch.inputs)
    with torch.no_grad():  # the grad path (checkpointed) equals the no-grad path
        with capture(backend, [1]) as ref:
            backend.model(**batch.inputs)
    valid = batch.inputs["attention_mask"].bool()
    assert (maps[1] - ref[1]).detach()[valid].abs().max() < 1e-6
    maps[1].sum().backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in backend.model.model.language_model.layers[1].parameters()
    )


def test_recipes_and_mixing():
    recipe = load_recipe("drive-kd")
    assert [s.kind for s in recipe.values()] == ["attn_tv", "attn_group", "attn_tv"]
    assert recipe["planning"].student_indices(4, 8) == [2]
    w = mixing_matrix("reference", recipe)
    assert torch.allclose(w, torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]))
    assert torch.allclose(mixing_matrix([[2, 1, 1], [0, 1, 0], [1, 1, 2]], recipe).sum(1), torch.ones(3))
    assert torch.equal(mixing_matrix("identity", load_recipe("ce-kl")), torch.ones(3, 1))
    with pytest.raises(DriveKDError, match="no such file or shipped recipe"):
        load_recipe("nope")


def _cfg(tmp_path, data_dir, teacher_dir, **over):
    raw = {
        "model": {"name": "tiny-internvl-student"},
        "teacher": str(teacher_dir),
        "recipe": "drive-kd",
        "combine": {"strategy": "agp"},
        "data": {"path": str(data_dir), "limit": 8},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "micro_batch_size": 4,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 1,
            "max_steps": 12,
        },
    }
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    tmp_path.mkdir(parents=True, exist_ok=True)
    f = tmp_path / "distill.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def _with_cache(config, folder):
    return config.model_copy(update={"teacher": config.teacher.model_copy(update={"cache": str(folder)})})


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weighted_recipe(tmp_path, weight):
    shipped = Path(__file__).parents[1] / "drivekd/distill/recipes/drive-kd.yaml"
    recipe = {k: {**v, "weight": weight} for k, v in yaml.safe_load(shipped.read_text()).items()}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(tmp_path / "recipe.yaml")


@pytest.mark.integration
def test_short_distillation_run_losses_fall(tmp_path, data_dir, teacher_dir):
    # The same 4 samples every step, so the curves are not batch noise; attention MSEs are ~1e-6 at
    # weight 1, so they are weighed up, and CE is switched off to watch the signals alone.
    cfg = load_config(
        DistillConfig,
        _cfg(
            tmp_path,
            data_dir,
            teacher_dir,
            recipe=_weighted_recipe(tmp_path, 1e5),
            ce_weight=0.0,
            data={"limit": 4},
            train={"max_steps": 10, "lr": 1e-3},
        ),
    )
    run_distill(cfg)
    rows = [m for m in _metrics(tmp_path / "run") if "perception" in m]
    assert len(rows) == 10
    for key in ("perception", "reasoning", "planning"):
        assert rows[-1][key] < 0.5 * rows[0][key], (key, rows[0][key], rows[-1][key])
    assert all(0 <= r["conflict_rate"] <= 1 and "cos/perception~planning" in r for r in rows)


@pytest.mark.integration
def test_agp_run_logs_anchor_coefficients_and_ce_falls(tmp_path, data_dir, teacher_dir):
    cfg = load_config(DistillConfig, _cfg(tmp_path, data_dir, teacher_dir, data={"limit": 4}, train={"max_steps": 8}))
    run_distill(cfg)
    rows = [m for m in _metrics(tmp_path / "run") if "ce" in m]
    assert rows[-1]["ce"] < 0.8 * rows[0]["ce"]
    assert all(r["coef/ce"] >= 3 - 1e-6 for r in rows)  # stage 1 keeps the anchor once per capability


def test_layout_mismatch_is_refused(data_dir):
    """The probe behind the config-level family check: names both families and the visual tokens."""
    from drivekd.distill.teachers import check_same_layout

    student, teacher = load_backend("tiny-internvl-student"), load_backend("tiny-qwen25vl-teacher")
    probe = load_split(data_dir, "train")[:2]
    with pytest.raises(DriveKDError, match=r"\(qwen25vl\) and the student \(internvl\) tokenise sample .* visual"):
        check_same_layout(student, teacher, probe, "qwen")


@pytest.mark.integration
def test_torchrun_agp_ranks_end_identical(tmp_path, data_dir, teacher_dir):
    cfg = _cfg(tmp_path, data_dir, teacher_dir, train={"max_steps": 2, "micro_batch_size": 2})
    r = run_torchrun("distill", "--config", str(cfg), port=29544)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"step": 2, "ranks_identical": True} in _metrics(tmp_path / "run")
    # every rank measured the loss weights on the same sample: the 2-process run's are one process's
    single = run_distill(
        load_config(
            DistillConfig, _cfg(tmp_path / "one", data_dir, teacher_dir, train={"max_steps": 1, "micro_batch_size": 2})
        )
    )
    two = json.loads((tmp_path / "run" / "calibration.json").read_text())
    one = json.loads((single.parent / "calibration.json").read_text())
    assert two["weights"] == pytest.approx(one["weights"], rel=1e-5) and set(two["weights"]) == {
        "perception",
        "reasoning",
        "planning",
    }


@pytest.mark.integration
def test_torchrun_ce_only_distillation_averages_the_processes_gradients(tmp_path, data_dir, teacher_dir):
    # no signal: one loss and one ordinary backward, which must go through DDP's wrapper (the default
    # projection strategy would otherwise run the plain model and never reduce)
    train = {"max_steps": 2, "micro_batch_size": 2}
    cfg = _cfg(tmp_path, data_dir, teacher_dir, recipe="ce", train=train)
    r = run_torchrun("distill", "--config", str(cfg), port=29548)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"step": 2, "ranks_identical": True} in _metrics(tmp_path / "run")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("strategy", "gram", "checkpointing", "port"),
    [("sum", "buffer", False, 29546), ("agp", "modules", False, 29547), ("sum", "buffer", True, 29549)],
)
def test_torchrun_projection_heads_are_averaged_like_the_model(
    tmp_path, data_dir, teacher_dir, strategy, gram, checkpointing, port
):
    # hidden-state signals train projection heads beside the student, outside DDP's wrapper: with a
    # backward through DDP they must still be averaged, or the ranks (and, through clipping, the
    # student) drift apart; with checkpointed layers DDP's reduction runs during their recompute
    combine = {"strategy": strategy, "gram": gram}
    train = {"max_steps": 3, "micro_batch_size": 2, "activation_checkpointing": checkpointing}
    cfg = _cfg(tmp_path, data_dir, teacher_dir, recipe="ce-hidden", combine=combine, train=train)
    r = run_torchrun("distill", "--config", str(cfg), port=port)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"step": 3, "ranks_identical": True} in _metrics(tmp_path / "run")


@pytest.mark.integration
def test_amortised_agp_recomputes_every_n_steps(tmp_path, data_dir, teacher_dir):
    cfg = load_config(
        DistillConfig,
        _cfg(tmp_path, data_dir, teacher_dir, combine={"amortize_every": 2}, data={"limit": 4}, train={"max_steps": 4}),
    )
    run_distill(cfg)
    rows = [m for m in _metrics(tmp_path / "run") if "ce" in m]
    assert [("coef/ce" in r) for r in rows] == [True, False, True, False]
    # one log line over the 4 steps: the coefficients' mean over the 2 steps that computed them (an
    # amortised step reports none, and is no zero in their mean)
    over4 = load_config(
        DistillConfig,
        _cfg(
            tmp_path / "b",
            data_dir,
            teacher_dir,
            combine={"amortize_every": 2},
            data={"limit": 4},
            train={"max_steps": 4, "log_every": 4},
        ),
    )
    run_distill(over4)
    (line,) = [m for m in _metrics(tmp_path / "b" / "run") if "ce" in m]
    for key in ("coef/ce", "coef/reasoning", "conflict_rate"):
        assert line[key] == pytest.approx((rows[0][key] + rows[2][key]) / 2, rel=1e-9, abs=1e-12), key
    assert line["ce"] == pytest.approx(sum(r["ce"] for r in rows) / 4, rel=1e-9)  # every step reports CE


@pytest.mark.integration
def test_cached_targets_give_the_live_losses_and_bad_caches_are_refused(tmp_path, data_dir, teacher_dir):
    from drivekd.distill.engine import Distiller
    from drivekd.distill.run import run_cache_teacher
    from drivekd.distill.teachers import CachedTeachers
    from drivekd.train.sft import load_model, load_training_data

    cfg = load_config(DistillConfig, _cfg(tmp_path, data_dir, teacher_dir, recipe="ce-hidden", data={"limit": 6}))
    cache_dir = run_cache_teacher(cfg, tmp_path / "cache")
    assert (cache_dir / "manifest.json").is_file() and list(cache_dir.glob("shard-*.safetensors"))
    for recipe in ("drive-kd", "ce-hidden"):
        c = load_config(DistillConfig, _cfg(tmp_path, data_dir, teacher_dir, recipe=recipe, data={"limit": 6}))
        cache_dir = run_cache_teacher(c, tmp_path / f"cache-{recipe}")
        student = load_model(c.model)
        train, val, _ = load_training_data(c.data, student)
        live = Distiller(c, student, train + val)
        cached = Distiller(_with_cache(c, cache_dir), student, train + val)
        for d in (live, cached):
            d.set_weights(dict.fromkeys(d.names, 1.0))
        assert isinstance(cached.teachers, CachedTeachers)  # no teacher model is loaded
        if live.projections:
            cached.projections.load_state_dict(live.projections.state_dict())
        batch = student.build_batch(train[:4])
        with torch.no_grad():
            a, b = live.objective(student.model, batch), cached.objective(student.model, batch)
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=2e-3, atol=1e-9), (recipe, key, a[key], b[key])
    # a cache built for other data, or another teacher, is refused with one line
    other = load_config(DistillConfig, _cfg(tmp_path, data_dir, teacher_dir, recipe="drive-kd", data={"limit": 5}))
    with pytest.raises(DriveKDError, match="different data"):
        Distiller(
            _with_cache(other, tmp_path / "cache-drive-kd"),
            student,
            load_training_data(other.data, student)[0],
        )
    with pytest.raises(DriveKDError, match="different recipe"):
        Distiller(
            _with_cache(c, tmp_path / "cache-drive-kd").model_copy(update={"recipe": "planning"}), student, train + val
        )


@pytest.mark.integration
def test_projection_per_step_equals_per_micro_batch_without_accumulation(tmp_path, data_dir, teacher_dir):
    from safetensors.torch import load_file

    finals = {}
    for mode in ("micro_batch", "step"):
        cfg = load_config(
            DistillConfig,
            _cfg(
                tmp_path / mode,
                data_dir,
                teacher_dir,
                combine={"project_per": mode},
                data={"limit": 4},
                train={"max_steps": 3},
            ),
        )
        finals[mode] = load_file(run_distill(cfg) / "model.safetensors")
    assert all(torch.allclose(finals["step"][k], finals["micro_batch"][k], atol=1e-6) for k in finals["step"])
    accum = load_config(
        DistillConfig,
        _cfg(
            tmp_path / "accum",
            data_dir,
            teacher_dir,
            combine={"project_per": "step"},
            data={"limit": 8},
            train={"max_steps": 2, "grad_accum": 2},
        ),
    )
    run_distill(accum)
    rows = [m for m in _metrics(tmp_path / "accum" / "run") if "ce" in m]
    assert len(rows) == 2 and all("coef/ce" in r and r["coef/ce"] >= 3 - 1e-6 for r in rows)


@pytest.mark.integration
def test_distill_resume_matches_uninterrupted_run_with_projection_heads(tmp_path, data_dir, teacher_dir, monkeypatch):
    from safetensors.torch import load_file

    from drivekd.train.trainer import Trainer

    def config(where):
        return load_config(
            DistillConfig,
            _cfg(
                tmp_path / where,
                data_dir,
                teacher_dir,
                recipe="ce-hidden",
                data={"limit": 8},
                train={"max_steps": 4, "save_every": 2},
            ),
        )

    full = run_distill(config("a"))
    cfg = config("b")
    save = Trainer.save_checkpoint

    def killed_after_saving(self):  # the run dies right after its step-2 checkpoint
        save(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", killed_after_saving)
    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg)
    monkeypatch.undo()
    run = tmp_path / "b" / "run"
    assert (run / "checkpoints" / "step-0000002" / "extra.safetensors").is_file()  # projection heads kept
    calibrated = json.loads((run / "calibration.json").read_text())
    assert set(calibrated["weights"]) == {"perception", "reasoning", "planning"}
    (run / "calibration.json").write_text(json.dumps({**calibrated, "initial_losses": {}}))  # not measured again
    resumed = run_distill(cfg, resume=True)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_teacher_gives_full_teacher_targets(tmp_path, data_dir, teacher_dir):
    from drivekd.distill.engine import Distiller
    from drivekd.train.sft import load_model, load_training_data

    (tmp_path / "early-hidden.yaml").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "early-hidden.yaml").write_text("perception: {kind: hidden, layer: 1}\n")
    for recipe in (str(tmp_path / "early-hidden.yaml"), "drive-kd"):
        cfg = load_config(DistillConfig, _cfg(tmp_path, data_dir, teacher_dir, recipe=recipe, data={"limit": 4}))
        student = load_model(cfg.model)
        train, _, _ = load_training_data(cfg.data, student)
        d = Distiller(cfg, student, train)
        teacher = d.teachers.models[str(teacher_dir)]
        batch = student.build_batch(train[:3])
        got = d.teachers.internals(batch)[str(teacher_dir)]
        with torch.no_grad(), capture(teacher, range(teacher.num_layers)) as maps:
            full = teacher.model(**batch.inputs, output_hidden_states=True)
        for layer, m in got.maps.items():
            assert torch.allclose(m, maps[layer], atol=1e-6)
        if got.hidden is not None:
            assert len(got.hidden) == 4  # layers 0..2 ran: layer 1's output is still raw (not normed)
            for k in (1, 2):
                assert torch.allclose(got.hidden[k], full.hidden_states[k], atol=1e-5), k


@pytest.mark.integration
@pytest.mark.parametrize(
    "options",
    [{"combine": {"amortize_every": 3}}, {"combine": {"project_per": "step"}, "train": {"grad_accum": 2}}],
    ids=["amortize", "project-per-step"],
)
def test_distill_resume_is_bit_identical_for_stateful_options(tmp_path, data_dir, teacher_dir, monkeypatch, options):
    """Amortised coefficients and step-wise pending gradients live in the checkpoint."""
    resume_is_bit_identical(tmp_path, data_dir, teacher_dir, monkeypatch, options)


def resume_is_bit_identical(
    tmp_path, data_dir, teacher_dir, monkeypatch, options, config_class=DistillConfig, run=run_distill
):
    """A run killed inside step 3 and resumed from its step-2 checkpoint ends as the uninterrupted one,
    weights and logged figures alike (`run`: the runner of `config_class`; default `run_distill`)."""
    from safetensors.torch import load_file

    from drivekd.distill.engine import Distiller

    def config(where):
        train = {"max_steps": 5, "save_every": 2, "eval_every": 5, **options.get("train", {})}
        rest = {k: v for k, v in options.items() if k != "train"}
        return load_config(config_class, _cfg(tmp_path / where, data_dir, teacher_dir, train=train, **rest))

    full = run(config("a"))
    original = Distiller.objective
    calls = {"n": 0}
    stop_at = 3 * config("b").train.grad_accum  # dies inside step 3: the last checkpoint is step 2

    def dies(self, model, batch, **kw):
        calls["n"] += not kw.get("unit_weights")  # training steps, not the calibration before them
        if calls["n"] > stop_at:
            raise KeyboardInterrupt
        return original(self, model, batch, **kw)

    monkeypatch.setattr(Distiller, "objective", dies)
    with pytest.raises(KeyboardInterrupt):
        run(config("b"))
    monkeypatch.setattr(Distiller, "objective", original)
    resumed = run(config("b"), resume=True)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the resumed run's log has each step once, and the same figures as the uninterrupted one
    ma, mb = _metrics(full.parent), _metrics(resumed.parent)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    trained = [m for m in ma if any(k.startswith(("weight/", "coef/")) for k in m)]
    assert trained, "the runs log their loss weights / coefficients"
    for a_line, b_line in zip(
        trained, [m for m in mb if any(k.startswith(("weight/", "coef/")) for k in m)], strict=True
    ):
        assert {k: v for k, v in a_line.items() if k != "samples_per_s"} == {
            k: v for k, v in b_line.items() if k != "samples_per_s"
        }


@pytest.mark.integration
def test_distill_validation_reports_plain_ce_whatever_the_weights(tmp_path, data_dir, teacher_dir):
    runs = {}
    for w in (1.0, 3.0):
        cfg = _cfg(tmp_path / str(w), data_dir, teacher_dir, ce_weight=w, train={"max_steps": 1, "lr": 1e-12})
        runs[w] = [m for m in _metrics(run_distill(load_config(DistillConfig, cfg)).parent) if "val_ce" in m][-1]
    assert runs[1.0]["val_ce"] == pytest.approx(runs[3.0]["val_ce"], rel=1e-4)


@pytest.mark.integration
def test_recipe_errors_are_found_before_any_work(tmp_path, data_dir, teacher_dir):
    from .conftest import run_cli

    bad = tmp_path / "deep.yaml"
    bad.write_text("perception: {kind: attn_tv, layer: 50}\n")
    cfg = _cfg(tmp_path / "a", data_dir, teacher_dir, recipe=str(bad))
    r = run_cli("distill", "--config", str(cfg))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "layer 50 is outside the student tiny-internvl-student (4 LM layers" in r.stderr
    assert not (tmp_path / "a" / "run").exists()  # nothing created: no config.yaml, no metrics.jsonl
    qwen = tmp_path / "qwen"
    load_backend("tiny-qwen25vl-teacher").save(qwen)
    cfg = _cfg(tmp_path / "b", data_dir, qwen)
    with pytest.raises(DriveKDError, match=r"qwen2_5_vl model and the student .* internvl one: their visual tokens"):
        run_distill(load_config(DistillConfig, cfg))
    assert not (tmp_path / "b" / "run").exists()


def test_cache_fingerprint_follows_teacher_content_not_its_path(tmp_path, teacher_dir, monkeypatch):
    import shutil

    from drivekd.distill.cache import checkpoint_digest

    moved = tmp_path / "moved"
    shutil.copytree(teacher_dir, moved)
    monkeypatch.chdir(tmp_path)
    same = {checkpoint_digest(str(teacher_dir)), checkpoint_digest(str(teacher_dir) + "/"), checkpoint_digest("moved")}
    assert len(same) == 1 and checkpoint_digest(str(moved)) in same
    other = tmp_path / "other"
    load_backend("tiny-internvl-teacher", LoadOptions(seed=8)).save(other)
    assert checkpoint_digest(str(other)) not in same


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("perception: {kind: attn_tv, layer: '3'}\n", "signal 'perception': layer: Input should be a valid integer"),
        ("reasoning: {kind: attn_group, layers: [0, 1, 2]}\n", "layers: Tuple should have at most 2 items"),
        ("reasoning: {kind: attn_group, layers: [3, 1]}\n", "empty range"),
        ("kd: logit_kl\n", "expected its fields"),
        ("perception: {kind: attn_tv, distance: l1}\n", "distance: Input should be 'mse' or 'cosine'"),
        ("planning: {kind: attn_tv, teacher_layer: 8}\n", "layer 8 is outside the teacher .* \\(8 LM layers"),
        ("planning: {kind: attn_tv, teacher_layer: 1.5}\n", "teacher_layer: Input should be a valid integer"),
        ("reasoning: {kind: attn_group, teacher_layers: [0]}\n", "teacher_layers.1: Field required"),
        ("planning: {kind: attn_tv, layer: 0, layers: [0, 1]}\n", "give layer or layers, not both"),
    ],
)
def test_malformed_recipes_are_one_line_errors(tmp_path, data_dir, teacher_dir, recipe, message):
    from drivekd.distill.recipe import check_recipe

    f = tmp_path / "r.yaml"
    f.write_text(recipe)
    with pytest.raises(DriveKDError, match=message):
        check_recipe(load_config(DistillConfig, _cfg(tmp_path, data_dir, teacher_dir, recipe=str(f))))


def test_a_recipe_naming_only_teacher_layers_is_checked_against_the_teacher(tmp_path, data_dir, teacher_dir):
    from drivekd.distill.recipe import check_recipe

    f = tmp_path / "r.yaml"
    f.write_text(
        "planning: {kind: attn_tv, teacher_layer: -2}\nreasoning: {kind: attn_group, teacher_layers: [0, 3]}\n"
    )
    signals = check_recipe(load_config(DistillConfig, _cfg(tmp_path, data_dir, teacher_dir, recipe=str(f))))
    # the 8-layer teacher's layers 6 and 0..3 on the 4-layer student, by depth
    assert signals["planning"].pairs(4, 8) == [(2, [6])]
    assert signals["reasoning"].pairs(4, 8) == [(0, [0, 1, 2]), (1, [1, 2, 3])]


@pytest.mark.integration
def test_config_level_mistakes_are_found_before_loading(tmp_path, data_dir, teacher_dir):
    from drivekd.distill.recipe import check_recipe

    bad_mixing = load_config(DistillConfig, _cfg(tmp_path, data_dir, teacher_dir, mixing=[[1.0]]))
    with pytest.raises(DriveKDError, match="mixing matrix must be 3x3"):
        check_recipe(bad_mixing)
    with pytest.raises(DriveKDError, match="no checkpoint to resume from"):
        run_distill(load_config(DistillConfig, _cfg(tmp_path / "n", data_dir, teacher_dir)), resume=True)
    assert not (tmp_path / "n" / "run").exists()


@pytest.mark.integration
def test_a_finished_run_is_not_overwritten(tmp_path, data_dir, teacher_dir):
    cfg = load_config(DistillConfig, _cfg(tmp_path, data_dir, teacher_dir, recipe="ce", train={"max_steps": 1}))
    run_distill(cfg)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(DriveKDError, match="holds a finished run"):
        run_distill(cfg)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_cache_fingerprint_needs_weight_files(tmp_path):
    from drivekd.distill.cache import checkpoint_digest

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text("{}")
    with pytest.raises(DriveKDError, match="no weight files"):
        checkpoint_digest(str(tmp_path / "t"))
    (tmp_path / "t" / "pytorch_model.bin").write_bytes(b"one")
    first = checkpoint_digest(str(tmp_path / "t"))
    (tmp_path / "t" / "pytorch_model.bin").write_bytes(b"two")
    assert checkpoint_digest(str(tmp_path / "t")) != first


@pytest.mark.integration
def test_calibrated_weights_make_each_signal_start_at_its_share_of_ce(tmp_path, data_dir, teacher_dir):
    from drivekd.distill.calibrate import initial_losses, run_calibrate
    from drivekd.distill.recipe import load_recipe
    from drivekd.train.sft import load_model, load_training_data

    cfg = load_config(DistillConfig, _cfg(tmp_path, data_dir, teacher_dir, data={"limit": 8}))
    recipe, result = run_calibrate(cfg, tmp_path / "calibrated.yaml", share=0.2, batches=2)
    signals = load_recipe(str(recipe))
    assert list(signals) == ["perception", "reasoning", "planning"]
    for name, sig in signals.items():
        assert sig.weight * result["initial_losses"][name] == pytest.approx(
            0.2 * result["initial_losses"]["ce"], rel=1e-5
        )
    # measured again with the calibrated recipe on the same random sample: every signal starts at 0.2 x CE
    from drivekd.train.order import calibration_sample

    student = load_model(cfg.model)
    train, _, _ = load_training_data(cfg.data, student)
    sample = calibration_sample(train, cfg.train, batches=2)
    again = initial_losses(cfg.model_copy(update={"recipe": str(recipe)}), student, sample, batches=2, batch_size=4)
    for name, sig in signals.items():
        assert sig.weight * again[name] == pytest.approx(0.2 * again["ce"], rel=1e-4)
    with pytest.raises(DriveKDError, match="share must be a positive number"):
        run_calibrate(cfg, tmp_path / "x.yaml", share=0)


def test_cache_data_identity_survives_a_moved_dataset_and_sees_changed_images(tmp_path, data_dir):
    import shutil

    from drivekd.data.formats import load_split
    from drivekd.distill.cache import data_identity

    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(data_dir, moved)
    here, there = load_split(data_dir, "train"), load_split(moved, "train")
    assert here[0].images[0].path != there[0].images[0].path
    assert data_identity(here) == data_identity(there)
    first = there[0].images[0]
    other = next(f.read_bytes() for f in sorted(Path(first.path).parent.glob("*.png")) if str(f) != first.path)
    assert other != Path(first.path).read_bytes()
    Path(first.path).write_bytes(other)  # same name, other pixels: a re-rendered dataset
    assert data_identity(load_split(moved, "train")) != data_identity(here)
    # a BMP repainted below its first 64 KiB: same size, same head, other pixels
    from PIL import Image

    bmp = Path(first.path).with_suffix(".bmp")
    Image.new("RGB", (200, 200), (10, 20, 30)).save(bmp)
    there[0].images[0] = type(first)(first.camera, str(bmp))
    before = data_identity(there)
    repainted = Image.new("RGB", (200, 200), (10, 20, 30))
    repainted.paste((200, 0, 0), (0, 0, 200, 20))  # BMP rows are stored bottom-up: the top rows come last
    repainted.save(bmp)
    assert bmp.stat().st_size > 64 * 1024 and data_identity(there) != before
    there[0].images[0] = type(first)(first.camera, first.path.replace(".png", "-b.png"))
    shutil.copy(first.path, there[0].images[0].path)
    assert data_identity(there) != data_identity(here)


def test_a_cache_of_another_format_is_refused_by_name(tmp_path):
    from drivekd.distill.cache import FORMAT, TeacherCache

    (tmp_path / "manifest.json").write_text(json.dumps({"format": "drivekd-teacher-cache/1", "fingerprint": {}}))
    with pytest.raises(DriveKDError, match=f"format 'drivekd-teacher-cache/1', this drivekd reads '{FORMAT}'"):
        TeacherCache(tmp_path)
