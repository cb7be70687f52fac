"""A sharded student (`train.distributed: fsdp`, FSDP2) on 2 CPU processes: the same weights as one
process with the same global batch, the learning-rate schedule of one process, and exact resume."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from drivekd.errors import DriveKDError
from drivekd.train.config import DistillConfig, load_config

from .conftest import kill_tree, run_torchrun


@pytest.fixture(scope="module")
def even_data(tmp_path_factory):
    """16 training samples whose answers all have the same tokens, and 7 validation samples.

    CE is a mean over a micro-batch's answer tokens: with answers of different lengths, the mean of two
    processes' means is not one process's mean over both halves (under DDP as under FSDP), so one length
    makes the comparison exact. 16 = 2 processes x 2 samples x 2 accumulated micro-batches x 2 steps an
    epoch; 7 validation samples split 4 + 3 across the processes (a sharded forward is collective, so
    the process with fewer runs a discarded batch)."""
    from drivekd.data.drivesim.generate import GenerateConfig, generate

    out = tmp_path_factory.mktemp("fsdp") / "data"
    generate(out, GenerateConfig(scenes=8, seed=21))
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()][:16]
    assert len(rows) == 16
    for row in rows:
        row["answer"] = "Final: {A}"
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len((out / "val.jsonl").read_text().splitlines()) == 7
    return out


def _config(tmp_path, data, teacher_dir, name, recipe="drive-kd", **train):
    raw = {
        "model": {"name": "tiny-internvl-student"},
        "teacher": str(teacher_dir),
        "recipe": recipe,
        "combine": {"strategy": "agp", "project_per": "step"},
        "data": {"path": str(data)},
        "train": {
            "output_dir": str(tmp_path / name),
            "micro_batch_size": 2,
            "grad_accum": 2,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 1,
            "max_steps": 8,
            **train,
        },
    }
    file = tmp_path / f"{name}.yaml"
    file.write_text(yaml.safe_dump(raw))
    return file


def _weights(run):
    return load_file(run / "final" / "model.safetensors")


def _logged(run):
    """Each logged step's figures (losses, AGP's figures), without the clock's."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in lines if "lr" in r]


def _learning_rates(run):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["lr"] for r in lines if "lr" in r]


@pytest.mark.integration
def test_fsdp_and_ddp_agp_per_step_equal_one_process_with_the_same_global_batch(tmp_path, even_data, teacher_dir):
    from drivekd.distill.run import run_distill

    # one process: 4 samples a micro-batch, the two processes' 2 + 2
    run_distill(load_config(DistillConfig, _config(tmp_path, even_data, teacher_dir, "one", micro_batch_size=4)))
    # the sharded run also checkpoints its layers' activations (the gradients do not change)
    for name, options, port in (
        ("fsdp", {"distributed": "fsdp", "activation_checkpointing": True}, 29561),
        ("ddp", {"distributed": "ddp"}, 29562),
    ):
        r = run_torchrun(
            "distill", "--config", str(_config(tmp_path, even_data, teacher_dir, name, **options)), port=port
        )
        assert r.returncode == 0, r.stderr[-3000:]
    one, sharded, replicated = (_weights(tmp_path / n) for n in ("one", "fsdp", "ddp"))
    assert one.keys() == sharded.keys() == replicated.keys()  # the gathered model saves as the plain one
    for other in (sharded, replicated):
        worst = max(float((one[k].double() - other[k].double()).abs().max()) for k in one)
        assert worst <= 1e-5, worst
    # each log line is the mean over the global batch, not over the main process's half of it
    logged = {n: _logged(tmp_path / n) for n in ("one", "fsdp", "ddp")}
    assert len(logged["one"]) == 8 and {"ce", "perception", "reasoning", "planning"} <= logged["one"][0].keys()
    for name in ("fsdp", "ddp"):
        for want, got in zip(logged["one"], logged[name], strict=True):
            assert want.keys() == got.keys()
            for k in want:
                # AGP's figures (gradient cosines, coefficients) come from the Gram matrix of gradients
                # summed in another order: rounding, magnified where a cosine is small
                tolerance = {"rel": 1e-4, "abs": 1e-6} if "/" not in k else {"abs": 1e-3}
                assert got[k] == pytest.approx(want[k], **tolerance), (name, want["step"], k)
    # the schedule is one process's: accelerate's scheduler wrapper would step it once per process
    assert _learning_rates(tmp_path / "fsdp") == _learning_rates(tmp_path / "one") == _learning_rates(tmp_path / "ddp")
    assert len(_learning_rates(tmp_path / "one")) == 8 and _learning_rates(tmp_path / "one")[-1] == 0.0
    # the sharded run's checkpoint holds each process's shards, beside the whole-model files
    assert (tmp_path / "fsdp" / "final" / "config.json").is_file()
    metrics = (tmp_path / "fsdp" / "metrics.jsonl").read_text()
    assert '"val_ce"' in metrics and '"ranks_identical": true' in metrics


@pytest.mark.integration
def test_fsdp_run_killed_after_a_checkpoint_resumes_bit_identically(tmp_path, even_data, teacher_dir):
    # attention maps and a hidden-state signal: the student's hidden width differs from the teacher's,
    # so a projection head trains beside the sharded model, whole on every process, and is checkpointed
    recipe = tmp_path / "maps-and-hidden.yaml"
    recipe.write_text(
        "perception: {kind: attn_tv, layer: 0}\nreasoning: {kind: attn_group, layers: [0, -2]}\n"
        "planning: {kind: hidden, layer: -2}\n"
    )
    options = {"recipe": str(recipe), "distributed": "fsdp", "max_steps": 6, "save_every": 2}
    whole = _config(tmp_path, even_data, teacher_dir, "whole", **options)
    r = run_torchrun("distill", "--config", str(whole), port=29563)
    assert r.returncode == 0, r.stderr[-3000:]
    killed = _config(tmp_path, even_data, teacher_dir, "killed", **options)
    run = tmp_path / "killed"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29564"]
    proc = subprocess.Popen(
        [*launch, "-m", "drivekd", "distill", "--config", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "step-0000002").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    assert kill_tree(proc) >= 3  # the launcher and both workers, mid-run
    assert not (run / "final").exists(), "the run finished before it could be killed"
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert (checkpoint / "sharded" / ".metadata").is_file()
    assert {p.name for p in (checkpoint / "sharded").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    r = run_torchrun("distill", "--config", str(killed), "--resume", port=29565)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _weights(tmp_path / "whole"), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (checkpoint / "extra.safetensors").exists()  # the head is in the sharded checkpoint
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("coef/planning" in m for m in metrics)  # AGP combined the head's gradient too


def test_fsdp_config_mistakes_are_found_when_the_config_is_read(tmp_path, even_data, teacher_dir):
    fp16 = _config(tmp_path, even_data, teacher_dir, "fp16", distributed="fsdp", mixed_precision="fp16")
    with pytest.raises(DriveKDError, match=r"fp16 with train\.distributed: fsdp"):
        load_config(DistillConfig, fp16)
    # a projection strategy's per-loss gradients bypass the fp16 loss scaler (any sharding)
    with pytest.raises(DriveKDError, match=r"fp16 with combine\.strategy: agp"):
        load_config(DistillConfig, _config(tmp_path, even_data, teacher_dir, "fp16agp", mixed_precision="fp16"))
    modules = _config(tmp_path, even_data, teacher_dir, "modules", distributed="fsdp")
    with pytest.raises(DriveKDError, match=r"gram: modules with train\.distributed: fsdp"):
        load_config(DistillConfig, modules, ["combine.gram=modules", "combine.project_per=micro_batch"])


@pytest.mark.integration
def test_a_run_resumes_only_under_the_sharding_it_was_written_with(tmp_path, even_data, teacher_dir):
    cfg = _config(tmp_path, even_data, teacher_dir, "run", max_steps=1, save_every=1, micro_batch_size=4, grad_accum=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = [sys.executable, "-m", "drivekd", "distill", "--config", str(cfg)]
    assert subprocess.run(first, capture_output=True, text=True, env=env).returncode == 0
    r = subprocess.run([*first, "--resume", "train.distributed=fsdp"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "train.distributed" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_several_processes_train_whole_global_batches_only():
    from drivekd.train.order import batches_in_epoch

    assert batches_in_epoch(7, 4, 1) == (2, 0)  # one process trains the short last batch
    # two processes: the last 3 would split 2 + 1 (the lone sample weighing double) and 5 would leave
    # one process a single sample against the other's none
    assert batches_in_epoch(7, 4, 2) == (1, 3)
    assert batches_in_epoch(9, 4, 2) == (2, 1)
    assert batches_in_epoch(8, 4, 2) == (2, 0)
    assert batches_in_epoch(3, 4, 2) == (0, 3)  # the trainer refuses this: no whole batch


def test_fsdp_with_lora_is_refused_when_the_config_is_read(tmp_path, even_data, teacher_dir):
    cfg = _config(tmp_path, even_data, teacher_dir, "lora", distributed="fsdp")
    with pytest.raises(DriveKDError, match=r"model\.lora with train\.distributed: fsdp"):
        load_config(DistillConfig, cfg, ["model.lora={r: 4, target_modules: [q_proj]}"])


def test_a_short_last_step_averages_the_micro_batches_it_has():
    from drivekd.train.order import micro_batches_in_step

    # 5 micro-batches an epoch, 2 a step: steps of 2, 2 and 1; the last one's gradient is its one
    # micro-batch's, not half of it
    assert [micro_batches_in_step(start, 5, 2) for start in (0, 2, 4)] == [2, 2, 1]
    assert micro_batches_in_step(0, 5, 8) == 5


def test_epochs_train_every_micro_batch_of_every_epoch():
    from drivekd.train.order import steps_for_epochs

    # 10 micro-batches an epoch, 4 a step: steps of 4, 4 and 2 (it was 10 // 4 = 2 steps, 8 of 10 batches)
    assert steps_for_epochs(1, 10, 4) == 3 and steps_for_epochs(3, 10, 4) == 9
    assert steps_for_epochs(2, 5, 2) == 6
    assert steps_for_epochs(1.5, 10, 4) == 3 + 2  # half an epoch: 5 micro-batches, in 2 steps of 4
    assert steps_for_epochs(2.0, 7, 1) == 14 and steps_for_epochs(0.01, 7, 1) == 1
    # no float residue: 1.6 x 5 micro-batches is 8 (divmod(1.6, 1.0) leaves 0.6000000000000001)
    assert steps_for_epochs(1.6, 5, 1) == 8 and steps_for_epochs(0.3, 10, 1) == 3


def test_the_samples_several_processes_leave_out_are_drawn_anew_each_epoch():
    from drivekd.train.order import epoch_order

    lengths = list(range(100, 110))  # sample i has length 100 + i: 8 and 9 are the longest
    dropped = []
    for epoch in range(6):
        order = epoch_order(10, 0, epoch, 4, lengths, left_out=2)
        assert len(order) == 8 and len(set(order)) == 8
        dropped.append(frozenset(range(10)) - set(order))
    # a length-sorted order's short last batch would be the longest two, every epoch
    assert len(set(dropped)) > 1 and any(d != {8, 9} for d in dropped)


def test_a_model_whose_parameters_are_not_shards_is_refused_between_forward_and_backward():
    from drivekd.train.fsdp import check_sharded

    with pytest.raises(DriveKDError, match=r"FSDP kept 2 parameters gathered after the forward \(e\.g\. weight\)"):
        check_sharded(torch.nn.Linear(2, 2))
