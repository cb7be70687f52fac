"""Activation checkpointing (`train.activation_checkpointing`): each decoder layer runs again in the
backward pass, with attention capture and the Gram pass's taps, and every gradient is what it is
without checkpointing, bit for bit."""

import contextlib

import pytest
import torch
from safetensors.torch import load_file

from drivekd.models import capture, checkpointing
from drivekd.train.config import SFTConfig, load_config
from drivekd.train.sft import run_sft

from .test_gram_modules import _distiller_gradients, _tiny_distiller
from .test_train import _config as _sft_config

PATHS = (("sum", "buffer"), ("agp", "buffer"), ("agp", "modules"))


def _replays(monkeypatch):
    calls = []
    real = capture.replay
    monkeypatch.setattr(capture, "replay", lambda armed: (calls.append(len(armed)), real(armed))[1])
    return calls


@pytest.mark.parametrize("family", ["internvl", "qwen25vl"])
def test_checkpointed_student_gives_the_same_gradients_on_every_gradient_path(
    family,
    data_dir,
    teacher_dir,
    qwen_teacher_dir,
    tmp_path,
    monkeypatch,
):
    """The drive-kd recipe (maps captured whole and by text rows, their losses taken inside the layers)
    under `sum`, exact AGP with the task-gradient buffer, and exact AGP from the taps' Gram pass."""
    student, d, batch = _tiny_distiller(
        family, teacher_dir if family == "internvl" else qwen_teacher_dir, data_dir, tmp_path
    )
    student.model.train()
    want = {path: _distiller_gradients(d, batch, *path) for path in PATHS}
    checkpointing.enable(student.model)
    layers = [m for m in student.model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert len(layers) > student.num_layers  # the language model's layers and the vision tower's
    replays = _replays(monkeypatch)
    for path in PATHS:
        got, got_stats = _distiller_gradients(d, batch, *path)
        assert all(torch.equal(a, b) for a, b in zip(want[path][0], got, strict=True)), path
        assert got_stats == want[path][1], path
    # every backward recomputed layers with capture armed again (the captured layers among them)
    assert len(replays) >= 3 * len(layers) and set(replays) == {1}


def test_a_recompute_without_capture_armed_again_fails_loudly(data_dir, teacher_dir, tmp_path, monkeypatch):
    """The recompute must save what the first forward saved: without capture armed again it does not,
    and torch's checkpoint says so rather than pair the wrong tensors."""
    student, d, batch = _tiny_distiller("internvl", teacher_dir, data_dir, tmp_path)
    student.model.train()
    checkpointing.enable(student.model)
    monkeypatch.setattr(capture, "replay", lambda armed: contextlib.nullcontext())
    with pytest.raises(torch.utils.checkpoint.CheckpointError, match="different number of tensors"):
        _distiller_gradients(d, batch, "sum", "buffer")


def test_the_gram_pass_makes_no_taps_in_a_recompute(data_dir, teacher_dir, tmp_path):
    """After a step under checkpointing the Gram pass has nothing counted (taps made in a recompute
    would be counted as uses whose gradients never come)."""
    from drivekd.distill.aggregate import GradientAggregator

    from .test_gram_modules import _Single

    student, d, batch = _tiny_distiller("internvl", teacher_dir, data_dir, tmp_path)
    student.model.train()
    checkpointing.enable(student.model)
    d.aggregator = GradientAggregator(
        d.trainable, "agp", anchor="ce", seed=1, gram="modules", modules=lambda: [d.student.model, d.projections]
    )
    gramian = d.aggregator.gramian
    d.backward(d.objective(d.student.model, batch), _Single(), 0)
    assert not gramian._uses and all(not stack for stack in gramian._swapped.values())


@pytest.mark.integration
def test_sft_with_activation_checkpointing_trains_the_same_weights(tmp_path, data_dir, monkeypatch):
    made = []
    real = checkpointing._contexts
    monkeypatch.setattr(checkpointing, "_contexts", lambda: (made.append(1), real())[1])
    weights = {}
    for on in (False, True):
        cfg = load_config(
            SFTConfig, _sft_config(tmp_path / str(on), data_dir, max_steps=3, activation_checkpointing=on)
        )
        weights[on] = load_file(run_sft(cfg) / "model.safetensors")
        assert bool(made) == on  # the config reached the model: its layers were checkpointed
    assert weights[True].keys() == weights[False].keys()
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])


def test_a_frozen_vision_tower_builds_no_graph_under_checkpointing(data_dir, monkeypatch):
    """Only the language model's layers are recomputed: transformers' input-gradient hooks (for
    reentrant checkpointing) would make the frozen tower's activations require gradients, and its
    layers be kept and run backward for nothing."""
    from drivekd.data.formats import load_split
    from drivekd.models.loading import LoadOptions, load_backend
    from drivekd.train.sft import cross_entropy

    backend = load_backend("tiny-internvl-student", LoadOptions(freeze_vision=True))
    backend.model.train()
    checkpointing.enable(backend.model)
    recomputed = []
    real = checkpointing._Recompute.__enter__
    monkeypatch.setattr(checkpointing._Recompute, "__enter__", lambda self: (recomputed.append(1), real(self))[1])
    cross_entropy(backend.model, backend.build_batch(load_split(data_dir, "train")[:2]))["ce"].backward()
    assert len(recomputed) == backend.num_layers


def test_lora_gradients_are_the_same_under_checkpointing(data_dir):
    """A frozen base with LoRA adapters: nothing before the first layer needs a gradient, and the
    adapters' gradients come through the recompute unchanged."""
    from drivekd.data.formats import load_split
    from drivekd.models.loading import LoadOptions, load_backend
    from drivekd.train.sft import cross_entropy

    lora = {"r": 4, "lora_alpha": 8, "target_modules": r".*language_model.*\.(q_proj|v_proj)"}
    grads = []
    for on in (False, True):
        torch.manual_seed(0)  # the adapters' initialisation
        backend = load_backend("tiny-internvl-student", LoadOptions(lora=lora))
        backend.model.train()
        if on:
            checkpointing.enable(backend.model)
        cross_entropy(backend.model, backend.build_batch(load_split(data_dir, "train")[:2]))["ce"].backward()
        grads.append({n: p.grad for n, p in backend.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all("lora" in n for n in grads[0]) and len(grads[0]) > 4
    assert all(grads[0][n] is not None and torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_output_taps_under_checkpointing_keep_nothing_and_give_the_same_gradients(
    data_dir, teacher_dir, tmp_path, monkeypatch
):
    """Every Linear and the embedding tapped at their outputs: under checkpointing the taps' inputs are
    recomputed with the layers (a checkpointed forward keeps no more than without taps), and the
    Gram pass's gradients are bit-identical to the unchecked path's."""
    from drivekd.bench.plan_measure import LiveTensors
    from drivekd.distill import gramian as gm
    from drivekd.distill.aggregate import GradientAggregator

    monkeypatch.setattr(gm, "OUTPUT_TAP_FROM", 0)
    student, d, batch = _tiny_distiller("internvl", teacher_dir, data_dir, tmp_path)
    student.model.train()
    want = _distiller_gradients(d, batch, "agp", "modules")
    checkpointing.enable(student.model)
    got = _distiller_gradients(d, batch, "agp", "modules")
    assert all(torch.equal(a, b) for a, b in zip(want[0], got[0], strict=True)) and want[1] == got[1]

    def kept_after_forward(taps: bool) -> int:
        d.aggregator = GradientAggregator(
            d.trainable,
            "agp",
            anchor="ce",
            seed=1,
            gram="modules" if taps else "buffer",
            modules=lambda: [d.student.model, d.projections],
        )
        with LiveTensors() as live:
            losses = d.objective(d.student.model, batch)
            kept = live.live
            del losses
        if d.aggregator.gramian is not None:
            d.aggregator.gramian.remove()
        return kept

    assert kept_after_forward(taps=True) <= kept_after_forward(taps=False) + 64 * 1024


def test_checkpointing_with_the_modules_gram_pass_under_autocast_is_refused_at_config_load(tmp_path):
    """Under torch.vmap autocast does not reach composite ops (F.linear, SDPA): a layer recomputed in
    the batched Gram pass would compute in another precision than its first forward. The same step
    without checkpointing, or with the buffer path, is allowed."""
    from drivekd.errors import DriveKDError
    from drivekd.train.config import DistillConfig, load_config

    def config(**combine):
        f = tmp_path / "d.yaml"
        f.write_text(
            "model: {name: tiny-internvl-student}\nteacher: t\ndata: {path: d}\n"
            "train: {output_dir: o, activation_checkpointing: true, mixed_precision: bf16}\n"
            f"combine: {combine}\n".replace("'", "")
        )
        return load_config(DistillConfig, f)

    with pytest.raises(DriveKDError, match=r"activation_checkpointing with combine\.gram: modules") as e:
        config(strategy="agp", gram="modules")
    assert "\n" not in str(e.value)
    assert config(strategy="agp", gram="buffer").combine.gram == "buffer"
    assert config(strategy="sum", gram="modules").combine.strategy == "sum"

    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    linear = torch.nn.Linear(8, 8)

    def under_autocast(c):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dtypes.append((linear(q).dtype, (q @ k.transpose(-1, -2)).dtype))
        return c

    dtypes = []
    under_autocast(torch.ones(()))
    torch.vmap(under_autocast)(torch.ones(2))
    # the reason, as this torch has it: F.linear is cast outside vmap and not inside it
    assert dtypes[0] == (torch.bfloat16, torch.bfloat16) and dtypes[1][0] == torch.float32


def test_checkpointed_gradients_are_the_same_under_bf16_autocast(data_dir, teacher_dir, tmp_path):
    """The recompute runs under the autocast state of the first forward (torch's checkpoint keeps it)."""
    student, d, batch = _tiny_distiller("internvl", teacher_dir, data_dir, tmp_path)
    student.model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_stats = _distiller_gradients(d, batch, "agp", "buffer")
        checkpointing.enable(student.model)
        got, got_stats = _distiller_gradients(d, batch, "agp", "buffer")
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True)) and want_stats == got_stats


def test_dropout_in_a_checkpointed_layer_draws_the_same_masks_on_every_path(data_dir, teacher_dir, tmp_path):
    """The recompute restores the generator state of the first forward; inside the Gram pass's
    batched backward it draws once for every lane (vmap's randomness "same")."""
    student, d, batch = _tiny_distiller("internvl", teacher_dir, data_dir, tmp_path)
    student.model.train()
    dropouts = [m for n, m in student.model.named_modules() if isinstance(m, torch.nn.Dropout) and "vision" in n]
    assert dropouts
    for m in dropouts:
        m.p = 0.1
    want = {}
    for path in PATHS:
        torch.manual_seed(1)
        want[path] = _distiller_gradients(d, batch, *path)
    checkpointing.enable(student.model)
    for path in PATHS:
        torch.manual_seed(1)
        got, got_stats = _distiller_gradients(d, batch, *path)
        assert all(torch.equal(a, b) for a, b in zip(want[path][0], got, strict=True)), path
        assert got_stats == want[path][1], path


def test_a_checkpointed_forward_never_backpropagated_is_freed(data_dir, teacher_dir, tmp_path):
    """The recompute's context keeps no reference to the capture block's sink, which holds the
    graph's losses (a cycle through autograd's nodes would keep the whole graph alive)."""
    import gc

    from drivekd.bench.plan_measure import LiveTensors

    student, d, batch = _tiny_distiller("internvl", teacher_dir, data_dir, tmp_path)
    student.model.train()
    checkpointing.enable(student.model)
    with LiveTensors() as live:
        losses = d.objective(d.student.model, batch)
        assert live.live > 1_000_000
        del losses
        gc.collect()
        assert live.live == 0
    assert not checkpointing.recomputing() and not capture._ARMED and not capture._ACTIVE
