import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drivekd.data.choices import shuffle_choices
from drivekd.data.drivesim.generate import GenerateConfig, generate
from drivekd.errors import DataError
from drivekd.train.config import SFTConfig, load_config
from drivekd.train.sft import cross_entropy, load_model, load_training_data, run_sft
from drivekd.train.trainer import Trainer

from .conftest import run_cli, run_torchrun


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "data"
    generate(out, GenerateConfig(scenes=4, seed=5))
    return out


def _config(tmp_path: Path, data_dir: Path, **train) -> Path:
    cfg = {
        "model": {"name": "tiny-internvl-student"},
        "data": {"path": str(data_dir), "limit": 8},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "micro_batch_size": 4,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 1,
            **train,
        },
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    f = tmp_path / "cfg.yaml"
    import yaml

    f.write_text(yaml.safe_dump(cfg))
    return f


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_sft_loss_falls_and_checkpoint_is_hf(tmp_path, data_dir):
    cfg = load_config(SFTConfig, _config(tmp_path, data_dir, max_steps=24, val_max_samples=8))
    final = run_sft(cfg)
    ce = [m["ce"] for m in _metrics(tmp_path / "run") if "ce" in m]
    assert len(ce) == 24
    assert sum(ce[-4:]) / 4 < 0.7 * sum(ce[:4]) / 4  # 24 steps on 8 samples: a clear fall, not convergence
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert (tmp_path / "run" / "config.yaml").read_text().startswith("model:")
    assert any("val_ce" in m for m in _metrics(tmp_path / "run"))


@pytest.mark.integration
def test_resume_matches_uninterrupted_run(tmp_path, data_dir, monkeypatch):
    # Re-lettered options and length-grouped batches are functions of (seed, epoch): a resume repeats them.
    options = ["data.shuffle_choices=true", "train.group_by_length=true"]
    full = load_config(SFTConfig, _config(tmp_path / "a", data_dir, max_steps=6, save_every=3, grad_accum=2), options)
    run_sft(full)

    cfg = load_config(SFTConfig, _config(tmp_path / "b", data_dir, max_steps=6, save_every=3, grad_accum=2), options)
    save = Trainer.save_checkpoint

    def killed_after_saving(self):  # the run dies right after its step-3 checkpoint
        save(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", killed_after_saving)
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "b" / "run" / "checkpoints").iterdir()) == ["step-0000003"]
    run_sft(cfg, resume=True)

    a = load_file(tmp_path / "a" / "run" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "run" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [m["step"] for m in _metrics(tmp_path / "b" / "run") if "ce" in m]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated metrics after the resume


@pytest.mark.integration
def test_loader_workers_build_the_same_batches(tmp_path, data_dir):
    # Forked workers build batches ahead of the step; the weights must not depend on it, across
    # epochs, re-lettered options, length grouping and accumulation.
    options = ["data.shuffle_choices=true", "train.group_by_length=true"]
    finals = []
    for workers in (0, 2):
        run = tmp_path / f"w{workers}"
        cfg = load_config(SFTConfig, _config(run, data_dir, max_steps=5, grad_accum=2, micro_batch_size=2), options)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"loader_workers": workers})})
        finals.append(load_file(run_sft(cfg) / "model.safetensors"))
        assert [m["step"] for m in _metrics(run / "run") if "ce" in m] == [1, 2, 3, 4, 5]
    a, b = finals
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mix_adds_a_seeded_subset_of_another_dataset_to_training_only(tmp_path, data_dir):
    objects = tmp_path / "objects"
    generate(objects, GenerateConfig(scenes=5, seed=9, task="objects"))
    n_objects = len((objects / "train.jsonl").read_text().splitlines())
    backend = load_model(load_config(SFTConfig, _config(tmp_path, data_dir)).model)
    plain_train, plain_val, _ = load_training_data(load_config(SFTConfig, _config(tmp_path, data_dir)).data, backend)

    def mixed(spec: str):
        cfg = load_config(SFTConfig, _config(tmp_path, data_dir), [f"data.mix={spec}"])  # a YAML list override
        return load_training_data(cfg.data, backend)

    train, val, stats = mixed(f"[{{path: {objects}, samples: 3, seed: 1}}]")
    assert stats["mixed_in"] == 3 and len(train) == len(plain_train) + 3
    assert [s.id for s in train[: len(plain_train)]] == [s.id for s in plain_train]
    extra = train[len(plain_train) :]
    assert all(s.id.startswith("objects:scene-") for s in extra)  # QA and objects both number scene-00000-q00
    assert len({s.id for s in train}) == len(train)
    assert [s.id for s in val] == [s.id for s in plain_val]  # validation stays the main data's
    assert [s.id for s in mixed(f"[{{path: {objects}, samples: 3, seed: 1}}]")[0]] == [s.id for s in train]
    assert [s.id for s in mixed(f"[{{path: {objects}, samples: 3, seed: 2}}]")[0]] != [s.id for s in train]
    assert len(mixed(f"[{{path: {objects}}}]")[0]) == len(plain_train) + n_objects
    reasoning = load_config(
        SFTConfig, _config(tmp_path, data_dir), [f"data.mix=[{{path: {objects}}}]", "data.capability=reasoning"]
    )
    train, _, stats = load_training_data(reasoning.data, backend)  # objects items are all perception
    assert stats["mixed_in"] == 0 and train and all(s.capability == "reasoning" for s in train)
    with pytest.raises(DataError, match=f"objects: data.mix asks for {n_objects + 1} samples, it holds {n_objects}"):
        mixed(f"[{{path: {objects}, samples: {n_objects + 1}}}]")


@pytest.mark.integration
def test_group_by_length_pads_less_and_keeps_every_sample_once(tmp_path, data_dir):
    def padded_tokens(trainer, order):
        lengths, gb = trainer._token_lengths(), trainer.global_batch
        return sum(
            max(lengths[i] for i in order[b : b + gb]) * len(order[b : b + gb]) for b in range(0, len(order), gb)
        )

    cfgs = {
        grouped: load_config(SFTConfig, _config(tmp_path, data_dir, micro_batch_size=4, group_by_length=grouped))
        for grouped in (False, True)
    }
    backend = load_model(cfgs[True].model)
    train, val, _ = load_training_data(cfgs[True].data.model_copy(update={"limit": None}), backend)
    plain, grouped = (Trainer(cfgs[g].train, backend, train, val, cross_entropy) for g in (False, True))
    for epoch in range(3):
        order = grouped.epoch_order(epoch)
        assert sorted(order) == list(range(len(train)))
        assert order == grouped.epoch_order(epoch)
        assert padded_tokens(grouped, order) < padded_tokens(plain, plain.epoch_order(epoch))
    assert grouped.epoch_order(0) != grouped.epoch_order(1)


@pytest.mark.integration
def test_shuffled_choices_reach_the_batch_and_change_per_epoch(tmp_path, data_dir):
    cfg = load_config(SFTConfig, _config(tmp_path, data_dir), ["data.shuffle_choices=true"])
    backend = load_model(cfg.model)
    train, val, _ = load_training_data(cfg.data.model_copy(update={"limit": None}), backend)
    trainer = Trainer(cfg.train, backend, train, val, cross_entropy, augment=shuffle_choices)
    index = next(i for i, s in enumerate(train) if s.choices and len(s.choices) >= 3)
    seen = set()
    for epoch in range(12):
        (s,) = [x for x in trainer._local_batch(list(range(len(train))), index // 4, epoch) if x.id == train[index].id]
        assert s.choices[s.correct_choice] == train[index].choices[train[index].correct_choice]
        seen.add(s.correct_choice)
    assert len(seen) >= 2


def test_capability_filter_and_overlong_policy(tmp_path, data_dir):
    cfg = load_config(SFTConfig, _config(tmp_path, data_dir), ["data.capability=planning", "data.limit=null"])
    backend = load_model(cfg.model)
    train, _, _ = load_training_data(cfg.data, backend)
    assert train and all(s.capability == "planning" for s in train)
    short = load_config(SFTConfig, _config(tmp_path, data_dir), ["data.max_length=100"])
    with pytest.raises(DataError, match=r"sample scene-\d+-q\d+: \d+ tokens exceed data.max_length=100"):
        load_training_data(short.data, backend)
    skip = load_config(
        SFTConfig, _config(tmp_path, data_dir), ["data.max_length=190", "data.on_overlong=skip", "data.limit=null"]
    )
    kept, val, stats = load_training_data(skip.data, backend)
    assert stats["skipped_overlong_train"] > 0 and stats["train"] == len(kept) > 0
    assert all(backend.token_lengths(s) <= 190 for s in kept)
    # validation samples are skipped by the same rule, and counted too (they were dropped silently)
    assert stats["skipped_overlong_val"] > 0 and stats["val"] == len(val)
    assert all(backend.token_lengths(s) <= 190 for s in val)


@pytest.mark.integration
def test_config_errors_are_one_line(tmp_path, data_dir):
    cfg = _config(tmp_path, data_dir)
    for override, needle in [
        ("train.lrr=1", "unknown field `train.lrr` (did you mean `train.lr`?)"),
        ("train.micro_batch_size=many", "train.micro_batch_size: Input should be a valid integer"),
        ("train.tag_attention_weight=1", "`train.tag_attention_weight` moved to an experimental SFT command"),
    ]:
        r = run_cli("sft", "--config", str(cfg), *override.split())
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    r = run_cli("sft", "--config", str(cfg), "model.name=/no/such/model")
    assert r.returncode == 2 and "no such model directory" in r.stderr


@pytest.mark.integration
def test_missing_images_fail_before_training(tmp_path, data_dir):
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(data_dir, broken)
    victim = sorted((broken / "images").iterdir())[0]
    victim.unlink()
    r = run_cli("sft", "--config", str(_config(tmp_path, broken)), "data.limit=null")
    assert r.returncode == 2 and victim.name in r.stderr and "missing" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.integration
def test_torchrun_two_processes_end_identical(tmp_path, data_dir):
    cfg = _config(tmp_path, data_dir, max_steps=3, micro_batch_size=2)
    r = run_torchrun("sft", "--config", str(cfg), port=29533)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = _metrics(tmp_path / "run")
    assert {"step": 3, "ranks_identical": True} in metrics
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_shipped_configs_validate():
    shipped = Path(__file__).parents[1].joinpath("configs")
    for path in sorted([*shipped.glob("sft-*.yaml"), *shipped.glob("pretrain-*.yaml")]):
        cfg = load_config(SFTConfig, path)
        assert cfg.train.output_dir and cfg.model.name
    from drivekd.train.config import DistillConfig

    distill = sorted(shipped.glob("distill-*.yaml"))
    assert len(distill) >= 2
    for path in distill:
        cfg = load_config(DistillConfig, path)
        assert cfg.teacher.of("perception") and cfg.recipe


@pytest.mark.integration
def test_eval_then_score(tmp_path, data_dir):
    from drivekd.models.loading import load_backend

    load_backend("tiny-internvl-student").save(tmp_path / "model")
    pred = tmp_path / "pred.jsonl"
    r = run_cli(
        "eval",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(data_dir),
        "--split",
        "train",
        "--out",
        str(pred),
        "--limit",
        "6",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "4",
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert len(rows) == 6
    assert {"id", "capability", "question_type", "prediction", "reference", "question"} <= set(rows[0])
    assert any("choices" in row and "correct_choice" in row for row in rows)
    control = tmp_path / "control.jsonl"
    common = ("--model", str(tmp_path / "model"), "--data", str(data_dir), "--split", "train", "--limit", "6")
    c = run_cli("eval", *common, "--out", str(control), "--max-new-tokens", "8", "--other-images")
    assert c.returncode == 0 and "another scene's images" in c.stdout, c.stderr
    assert [json.loads(line)["id"] for line in control.read_text().splitlines()] == [row["id"] for row in rows]
    s = run_cli("score", str(pred), "--json")
    assert s.returncode == 0, s.stderr
    result = json.loads(s.stdout.splitlines()[0])
    assert result["samples"] == 6 and set(result["capabilities"]) == {"perception", "reasoning", "planning"}


def test_other_images_swaps_whole_scenes(data_dir):
    from drivekd.data.formats import load_split
    from drivekd.data.sample import with_other_images

    samples = load_split(data_dir, "train")
    swapped = with_other_images(samples)
    assert [s.id for s in swapped] == [s.id for s in samples]
    assert [s.answer for s in swapped] == [s.answer for s in samples]
    donor_of = {}
    for before, after in zip(samples, swapped, strict=True):
        assert [im.camera for im in after.images] == [im.camera for im in before.images]
        donors = {Path(im.path).name.split("_")[0] for im in after.images}
        assert len(donors) == 1 and before.scene_id not in donors  # one other scene, whole
        donor = donors.pop()
        assert donor_of.setdefault(before.scene_id, donor) == donor  # all samples of a scene alike
    assert len(set(donor_of.values())) == len(donor_of) > 1  # every scene's images shown exactly once
    lone = [s for s in samples if s.scene_id == samples[0].scene_id]
    assert with_other_images(lone) == lone  # a single scene has no other images to show


@pytest.mark.integration
def test_val_image_gain_is_zero_when_images_carry_nothing(tmp_path, data_dir):
    import shutil

    # Validate on train: the fixture's val split is one scene, which has no other images to show.
    overrides = ["train.val_other_images=true", "train.val_max_samples=64", "data.val_split=train"]
    run_sft(load_config(SFTConfig, _config(tmp_path / "real", data_dir, max_steps=1), overrides))
    real = [m for m in _metrics(tmp_path / "real" / "run") if "val_image_gain" in m][-1]
    assert real["val_image_gain"] == pytest.approx(real["val_ce_other_images"] - real["val_ce"])
    assert abs(real["val_image_gain"]) > 1e-4  # a random model's CE moves with its images

    same = tmp_path / "same"
    shutil.copytree(data_dir, same)
    first = sorted((same / "images").glob("*.png"))[0].name.split("_")[0]
    for png in (same / "images").glob("*.png"):
        if not png.name.startswith(first + "_"):
            shutil.copy(same / "images" / f"{first}_{png.name.split('_', 1)[1]}", png)
    run_sft(load_config(SFTConfig, _config(tmp_path / "blind", same, max_steps=1), overrides))
    blind = [m for m in _metrics(tmp_path / "blind" / "run") if "val_image_gain" in m][-1]
    assert blind["val_image_gain"] == pytest.approx(0.0, abs=1e-6)
    assert blind["val_ce"] == pytest.approx(real["val_ce"], rel=0.2)  # same model and answers


@pytest.mark.integration
def test_a_fresh_start_replaces_the_log_of_a_failed_attempt(tmp_path, data_dir, monkeypatch):
    from drivekd.train import sft

    cfg = load_config(SFTConfig, _config(tmp_path, data_dir, max_steps=2))

    def broken(model, batch):
        raise RuntimeError("first step fails")

    monkeypatch.setattr(sft, "cross_entropy", broken)
    with pytest.raises(RuntimeError):
        run_sft(cfg)
    monkeypatch.undo()
    run_sft(cfg)  # no checkpoint was written: a fresh start, not a resume
    steps = [m["step"] for m in _metrics(tmp_path / "run")]
    assert steps.count(0) == 1 and steps == sorted(steps)


def test_a_data_file_without_validation_split_warns(tmp_path, data_dir, capsys):
    from drivekd.models.loading import load_backend
    from drivekd.train.config import DataConfig

    backend = load_backend("tiny-internvl-student")
    _, val, _ = load_training_data(DataConfig(path=str(data_dir / "train.jsonl"), limit=4), backend)
    assert val == [] and "no validation split" in capsys.readouterr().err
    load_training_data(DataConfig(path=str(data_dir), limit=4), backend)
    assert "no validation split" not in capsys.readouterr().err


def test_shipped_lora_configs_leave_a_frozen_vision_tower_frozen():
    # InternViT's attention has q/k/v_proj too: a LoRA target list must not reach into it
    import yaml

    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        raw = yaml.safe_load(path.read_text())
        model = raw.get("model", {})
        if not model.get("lora") or not model.get("freeze_vision"):
            continue
        backend = load_model_like(model)
        trainable = [n for n, p in backend.model.named_parameters() if p.requires_grad]
        assert trainable and not any("vision" in n for n in trainable), path.name


def load_model_like(model: dict):
    """The config's model options on the tiny preset of its family (same module names)."""
    from drivekd.models.loading import LoadOptions, load_backend

    preset = "tiny-qwen25vl-student" if "qwen" in model["name"].lower() else "tiny-internvl-student"
    return load_backend(preset, LoadOptions(freeze_vision=True, lora=model["lora"]))


def test_an_epochs_short_last_step_is_the_mean_of_its_micro_batches(tmp_path, data_dir):
    cfg = load_config(SFTConfig, _config(tmp_path, data_dir, micro_batch_size=3, grad_accum=2, max_steps=2))
    backend = load_model(cfg.model)
    train, _, _ = load_training_data(cfg.data.model_copy(update={"limit": 7}), backend)
    assert len(train) == 7  # 3 micro-batches an epoch: a step of 2, then a step of 1

    def one(model, batch):  # a loss worth 1 whatever the batch, so the scale it is given shows
        return {"ce": 1.0 + 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad)}

    seen = []

    def backward(losses, accelerator, step):
        seen.append((step, round(float(losses["ce"].detach()), 6)))
        accelerator.backward(losses["ce"])
        return {}

    trainer = Trainer(cfg.train, backend, train, [], one, backward=backward)
    trainer.train()
    assert seen == [(0, 0.5), (0, 0.5), (1, 1.0)]
