"""The distillation step's cheaper paths give the numbers of the plain ones they replaced, bit for bit.

Each reference below is the earlier code, kept here as the slow obvious version: head means with a
fresh tensor per operation, an additive mask per captured layer, loss masks rebuilt (and converted to
float, and counted) per layer, targets converted before they are padded, and the attention-map losses
taken after the forward from kept maps (not inside each layer's forward).
"""

import pytest
import torch
from accelerate import Accelerator

from drivekd.distill import signals, teachers
from drivekd.distill.signals import AttnMaps, AttnTV, Internals, Positions, map_distance
from drivekd.models import capture
from drivekd.models.capture import CapturedMaps, _additive


def _ref_head_mean(query, key, mask, scale, groups):
    heads = query.shape[1]
    total = None
    for h in range(heads):
        logits = torch.matmul(query[:, h], key[:, h // groups].transpose(1, 2)).float() * scale + mask[:, 0].float()
        probs = torch.softmax(logits, dim=-1)
        total = probs if total is None else total + probs
    return total / heads


def _ref_masks(sig, positions):
    if isinstance(sig, AttnTV):
        return positions.row_valid[:, :, None] & (positions.valid & positions.visual)[:, None, :]
    rows = cols = positions.valid
    return rows[:, :, None] & cols[:, None, :]


def _ref_map_distance(student, teacher, mask, distance):
    m = mask.to(student.dtype)
    if distance == "mse":
        return ((student - teacher.to(student.dtype)) ** 2 * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)
    s = (student * m).flatten(1)
    t = (teacher.to(student.dtype) * m).flatten(1)
    return 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=1, eps=1e-12)


def _ref_attention_loss(self, student, targets, positions, student_layers, projection=None):
    losses = [
        _ref_map_distance(self.student_map(student, s), t, _ref_masks(self, positions), self.distance)
        for s, t in zip(student_layers, targets, strict=True)
    ]
    return torch.stack(losses).mean(0)


def _ref_pad(items, shape):
    out = torch.zeros((len(items), *shape), dtype=torch.float32)
    for b, t in enumerate(items):
        out[(b, *(slice(0, n) for n in t.shape))] = t.float()
    return out


@pytest.fixture
def reference(monkeypatch):
    """Switches the step's cheaper paths back to the reference ones."""

    def use() -> None:
        monkeypatch.setattr(capture, "_head_mean", _ref_head_mean)
        monkeypatch.setattr(CapturedMaps, "additive", lambda self, *a: _additive(*a))
        monkeypatch.setattr(signals._Attention, "loss", _ref_attention_loss)
        monkeypatch.setattr(teachers, "_pad", _ref_pad)
        # no map losses inside the forward: the maps are kept and the losses taken after it
        monkeypatch.setattr(signals.BoundSignal, "map_losses", lambda self, *a: [])

    return use


@pytest.mark.parametrize(
    ("heads", "groups", "dtype"), [(1, 1, "float32"), (2, 2, "float32"), (4, 2, "float32"), (3, 1, "bfloat16")]
)
def test_head_mean_and_its_gradients_equal_the_plain_computation(heads, groups, dtype):
    torch.manual_seed(heads)
    dt = getattr(torch, dtype)
    q = torch.randn(2, heads, 7, 8, dtype=dt, requires_grad=True)
    k = torch.randn(2, heads // groups, 9, 8, dtype=dt, requires_grad=True)
    keep = torch.ones(7, 9, dtype=torch.bool).tril(2)[None, None].expand(2, 1, 7, 9).clone()
    keep[1, :, :, 6:] = False  # padding keys
    mask = _additive(keep, 7, 9, dt, q.device)
    grad = torch.randn(2, 7, 9)
    results = []
    for fn in (capture._map, lambda *a: torch.utils.checkpoint.checkpoint(_ref_head_mean, *a, use_reentrant=False)):
        out = fn(q, k, mask, 0.3, groups)
        (out.float() * grad).sum().backward()
        results.append((out.detach(), q.grad.clone(), k.grad.clone()))
        q.grad = k.grad = None
        with torch.no_grad():  # the teacher's path: no graph
            results[-1] += (fn(q, k, mask, 0.3, groups),)
    for new, ref in zip(*results, strict=True):
        assert torch.equal(new, ref)


def test_one_additive_mask_per_forward():
    sink = CapturedMaps()
    keep = torch.rand(2, 1, 5, 5) > 0.3
    first = sink.additive(keep, 5, 5, torch.float32, keep.device)
    assert sink.additive(keep, 5, 5, torch.float32, keep.device) is first
    assert torch.equal(first, _additive(keep, 5, 5, torch.float32, keep.device))
    other = keep.clone()
    assert sink.additive(other, 5, 5, torch.float32, keep.device) is not first
    assert torch.equal(
        sink.additive(None, 4, 5, torch.float32, keep.device), _additive(None, 4, 5, torch.float32, keep.device)
    )


@pytest.mark.parametrize("distance", ["mse", "cosine"])
def test_attention_losses_with_shared_masks_equal_the_per_layer_ones(distance):
    torch.manual_seed(0)
    b, t = 3, 11
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, 8:] = False
    valid[2, 5:] = False
    visual = torch.zeros(b, t, dtype=torch.bool)
    visual[:, 1:4] = True
    row_index, row_valid = capture.text_rows(valid.long(), visual)
    maps = {i: torch.rand(b, t, t, requires_grad=True) for i in range(3)}
    student = Internals(maps, row_index=row_index)
    full_targets = [torch.rand(b, t, t) for _ in range(3)]
    row_targets = [torch.rand(b, row_index.shape[1], t)]
    cases = [
        (AttnMaps(layers=(0, 2), distance=distance, kind="attn_group"), full_targets, [0, 1, 2]),
        (AttnTV(layer=0, distance=distance), row_targets, [0]),
        (AttnTV(layer=2, distance=distance), row_targets, [2]),
    ]

    def run(loss_of):
        positions = Positions(valid, visual, valid, row_valid)  # one per batch, as the distiller makes it
        total = sum(
            (i + 1) * loss_of(sig, student, targets, positions, layers)
            for i, (sig, targets, layers) in enumerate(cases)
        )
        grads = torch.autograd.grad(total.sum(), list(maps.values()))
        return total.detach(), grads

    new = run(lambda sig, *a: sig.loss(*a))
    ref = run(lambda sig, *a: _ref_attention_loss(sig, *a))
    assert torch.equal(new[0], ref[0])
    for g_new, g_ref in zip(new[1], ref[1], strict=True):
        assert torch.equal(g_new, g_ref)
    # map_distance still takes a boolean mask alone
    mask = _ref_masks(cases[0][0], Positions(valid, visual, valid, row_valid))
    assert torch.equal(
        map_distance(maps[0], full_targets[0], mask, distance),
        _ref_map_distance(maps[0], full_targets[0], mask, distance),
    )


def test_padded_targets_equal_the_converted_copies():
    items = [torch.randn(4, 6).half(), torch.randn(2, 3).half(), torch.randn(0, 5).half()]
    padded = teachers._pad(items, (5, 7))
    assert padded.dtype == torch.float16  # kept as stored: the losses convert exactly
    assert torch.equal(padded.float(), _ref_pad(items, (5, 7)))


def _tiny_step_setup(data_dir, teacher_dir, **combine):
    """The tiny student, its training samples, bench step's batch (the 4 longest) and a `drive-kd`
    config with the live tiny teacher."""
    from drivekd.data.formats import load_split
    from drivekd.models.loading import load_backend
    from drivekd.train.config import CombineConfig, DataConfig, DistillConfig, ModelConfig, TrainConfig

    student = load_backend("tiny-internvl-student")
    train = load_split(data_dir, "train")
    batch = student.build_batch(sorted(train, key=lambda s: -student.token_lengths(s))[:4])
    config = DistillConfig(
        model=ModelConfig(name="tiny-internvl-student"),
        teacher=str(teacher_dir),
        recipe="drive-kd",
        data=DataConfig(path=str(data_dir), val_split=None),
        train=TrainConfig(output_dir="unused", micro_batch_size=4),
        combine=CombineConfig(**combine),
    )
    return student, train, batch, config


@pytest.mark.parametrize("strategy", ["sum", "agp"])
def test_distillation_step_equals_the_reference_path(strategy, data_dir, teacher_dir, reference):
    """Bench step's step on the tiny student (live teacher): losses, every gradient and AGP's
    coefficients bit-equal with the reference paths."""
    from drivekd.distill.engine import Distiller

    student, train, batch, config = _tiny_step_setup(data_dir, teacher_dir, strategy=strategy)
    accelerator = Accelerator(cpu=True)

    def step():
        distiller = Distiller(config, student, train)
        distiller.set_weights(dict.fromkeys(distiller.names, 1.0))
        losses = distiller.objective(student.model, batch)
        values = {k: v.detach().clone() for k, v in losses.items()}
        stats = distiller.backward(losses, accelerator, 0)
        grads = {n: p.grad.clone() for n, p in student.model.named_parameters() if p.grad is not None}
        student.model.zero_grad(set_to_none=True)
        return values, grads, stats

    new = step()
    reference()
    ref = step()
    assert new[0].keys() == ref[0].keys() and new[1].keys() == ref[1].keys()
    for k in new[0]:
        assert torch.equal(new[0][k], ref[0][k]), k
    for n in new[1]:
        assert torch.equal(new[1][n], ref[1][n]), n
    assert new[2] == ref[2]  # AGP's coefficients and cosines (empty for sum)
    if strategy == "agp":
        assert any(k.startswith("coef/") for k in new[2])


def test_map_losses_inside_the_forward_keep_no_map_for_the_backward(data_dir, teacher_dir, reference):
    """The tensors the graph saves: with the losses taken inside each captured layer's forward, no
    `(B, T, T)` tensor; with kept maps (the reference), a map or a loss's difference per captured layer
    (the `(B, 1, T, T)` float masks SDPA makes of a padded batch's boolean one are alike in both)."""
    from drivekd.distill.engine import Distiller

    student, train, batch, config = _tiny_step_setup(data_dir, teacher_dir)
    b, t = batch.inputs["input_ids"].shape

    def map_sized_saves() -> int:
        distiller = Distiller(config, student, train)
        distiller.set_weights(dict.fromkeys(distiller.names, 1.0))
        saved: dict[int, int] = {}

        def pack(x):
            if tuple(x.shape) == (b, t, t):  # a head-mean map, a loss's difference or its mask
                saved[x.untyped_storage().data_ptr()] = x.numel()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            losses = distiller.objective(student.model, batch)
        full, _ = distiller.captured_student_layers()
        del losses
        return len(saved), len(full)

    fused, layers = map_sized_saves()
    reference()
    kept, _ = map_sized_saves()
    assert layers >= 3
    assert fused == 0
    assert kept >= layers


@pytest.mark.parametrize("strategy", ["sum", "agp"])
def test_a_steps_matrix_work_is_one_forward_and_each_losss_own_backward(strategy, data_dir, teacher_dir):
    """What `drivekd bench step`'s FLOP figures rest on: the buffer path's exact AGP step does the
    forward, each loss's backward as if it were alone (no pass through another loss's graph, no layer
    recomputed twice), the Gram and combination products over the P parameters and the coefficients'
    k x k arithmetic, nothing more; `sum` does the forward and one backward of the summed losses."""
    from drivekd.bench.step import matrix_flops, own_backward_flops
    from drivekd.distill.engine import Distiller

    student, train, batch, config = _tiny_step_setup(data_dir, teacher_dir, strategy=strategy)
    distiller = Distiller(config, student, train)
    distiller.set_weights(dict.fromkeys(distiller.names, 1.0))
    params = [p for p in student.model.parameters() if p.requires_grad]
    accelerator = Accelerator(cpu=True)
    parts = own_backward_flops(distiller, student.model, batch)
    step = matrix_flops(lambda: distiller.backward(distiller.objective(student.model, batch), accelerator, 0))
    student.model.zero_grad(set_to_none=True)
    assert sorted(parts) == sorted(["forward", "ce", *distiller.names])
    if strategy == "sum":

        def summed() -> None:
            torch.autograd.grad(sum(distiller.objective(student.model, batch).values()), params, allow_unused=True)

        assert step == matrix_flops(summed)
        return
    own = [n for name, n in parts.items() if name != "forward"]
    k, total = len(own), sum(p.numel() for p in params)
    assert min(own) > 0
    gram_and_combination = 2 * k * k * total + 2 * k * total
    coefficients = step - (parts["forward"] + sum(own) + gram_and_combination)
    assert 0 <= coefficients <= 64 * k**3  # AGP's projections: k x k products
