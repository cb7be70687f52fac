"""The `modules` Gram path (parameter taps, one k-batched backward, then one backward of sum w_i L_i)
against the `(k, P)` buffer path and against explicit Jacobians."""

import pytest
import torch

from drivekd.distill import aggregate
from drivekd.distill.aggregate import GradientAggregator
from drivekd.distill.combine import STRATEGIES
from drivekd.distill.gramian import ParameterGramian


class _Single:
    num_processes = 1

    @staticmethod
    def backward(loss):
        loss.backward()


class Toy(torch.nn.Module):
    """Tied input/output embedding, a module called twice, a layer whose output is unused, a frozen one."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.inner = torch.nn.Linear(6, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.unused = torch.nn.Linear(6, 6)
        self.frozen = torch.nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied, as in the tiny presets and Qwen2.5-VL-3B

    def forward(self, ids):
        h = self.embed(ids)
        h = torch.tanh(self.inner(h))
        h = self.norm(self.inner(h) + self.frozen(h))  # `inner` twice
        self.unused(h)  # computed, never used
        return h, self.head(h)


def _toy_losses(model, ids):
    h, logits = model(ids)
    return {
        "ce": torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()),
        "a": h.pow(2).mean(),
        "b": -logits[..., :3].mean(),
        "c": (h[:, 0] - 1).pow(2).mean() * 0.5,
    }


def _toy(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = Toy().to(dtype)
    ids = torch.randint(0, 11, (3, 5))
    return model, ids


def _jacobian(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for loss in _toy_losses(model, ids).values():
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        rows.append(
            torch.cat(
                [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
            )
        )
    return torch.stack(rows)


def test_gram_equals_explicit_jacobian_product_with_tied_repeated_and_unused_parameters():
    model, ids = _toy()
    jac = _jacobian(model, ids)
    want = jac @ jac.T
    gramian = ParameterGramian([model])
    got = gramian.gram(list(_toy_losses(model, ids).values()))
    assert got.dtype == torch.float64 and got.shape == (4, 4)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14), (got - want).abs().max()
    # the same again (taps are per forward), and nothing left in any .grad
    assert torch.allclose(gramian.gram(list(_toy_losses(model, ids).values())), want, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in model.parameters())
    # every parameter is a Parameter again after the forward
    assert all(
        isinstance(p, torch.nn.Parameter) for m in model.modules() for p in m._parameters.values() if p is not None
    )


@pytest.mark.parametrize("tied", [True, False])
def test_output_taps_give_the_explicit_jacobian_products(tied):
    """Every Linear and Embedding tapped at its output (threshold 0): `inner` is called twice, `unused`
    never reaches a loss, a tied embedding and head are taken together."""
    model, ids = _toy()
    if not tied:
        model.head.weight = torch.nn.Parameter(model.embed.weight.detach().clone() * 0.7)
    jac = _jacobian(model, ids)
    want = jac @ jac.T
    gramian = ParameterGramian([model], output_taps_from=0)
    tapped = {name for name, m in model.named_modules() if id(m) in gramian._output_tapped}
    assert tapped == {"embed", "inner", "unused", "head"}
    got = gramian.gram(list(_toy_losses(model, ids).values()))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14), (got - want).abs().max()
    assert all(p.grad is None for p in model.parameters())
    # outside `gram` the output taps pass gradients through unchanged
    sum(_toy_losses(model, ids).values()).backward()
    tapped_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    gramian.remove()
    model.zero_grad(set_to_none=True)
    sum(_toy_losses(model, ids).values()).backward()
    assert all(
        torch.equal(a, p.grad)
        for a, p in zip(tapped_grads, [p for p in model.parameters() if p.grad is not None], strict=True)
    )


@pytest.mark.parametrize("rows", [3, 40])  # few rows: <G_i G_j^T, X X^T>; many: G^T X by output blocks
def test_linear_and_embedding_gram_blocks_equal_their_gradients_products(rows, monkeypatch):
    from drivekd.distill import gramian as gm

    monkeypatch.setattr(gm, "GRAM_CHUNK", 64)  # several output blocks
    torch.manual_seed(rows)
    k, width, out = 4, 16, 37
    x = torch.randn(rows, width, dtype=torch.float64)
    g = torch.randn(k, rows, out, dtype=torch.float64)
    explicit = torch.stack([torch.cat([(g[i].T @ x).reshape(-1), g[i].sum(0)]) for i in range(k)])
    assert torch.allclose(gm.linear_gram(x, g, bias=True), explicit @ explicit.T, rtol=1e-12)
    ids = torch.randint(0, 9, (rows,))
    table = torch.zeros(k, 9, out, dtype=torch.float64)
    for i in range(k):
        table[i].index_add_(0, ids, g[i])
    table[:, 2] = 0  # the padding row takes no gradient
    flat = table.reshape(k, -1)
    assert torch.allclose(gm.embedding_gram(ids, g, padding_idx=2), flat @ flat.T, rtol=1e-12)
    # one (9, out) weight tied between that embedding and a head over `x2` (5 rows, width out)
    x2 = torch.randn(5, out, dtype=torch.float64)
    g2 = torch.randn(k, 5, 9, dtype=torch.float64)
    tied = (table + torch.stack([g2[i].T @ x2 for i in range(k)])).reshape(k, -1)
    assert torch.allclose(gm.tied_gram(ids, g, 2, x2, g2), tied @ tied.T, rtol=1e-12)


def test_output_taps_never_make_k_gradients_of_a_large_weight(monkeypatch):
    from drivekd.distill import gramian as gm

    monkeypatch.setattr(gm, "GRAM_CHUNK", 1024)  # the head's gradients a block of 32 output rows at a time
    torch.manual_seed(2)
    vocab, width = 4000, 32
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, width), torch.nn.Linear(width, vocab, bias=False))
    ids = torch.randint(0, vocab, (2, 6))

    def largest(threshold):
        gramian = ParameterGramian([model], output_taps_from=threshold)
        logits = model(ids)
        losses = [logits.logsumexp(-1).mean(), logits[..., 0].mean(), logits.pow(2).mean() * 1e-3, logits[..., 5].sum()]
        with _Largest() as seen:
            gram = gramian.gram(losses)
        gramian.remove()
        return seen.largest, gram

    tapped, gram_out = largest(0)
    plain, gram_params = largest(1 << 40)
    assert plain >= 4 * vocab * width > tapped  # the parameter taps' k gradients of the head, not the output taps'
    assert torch.allclose(gram_out, gram_params, rtol=1e-5)


class Deep(torch.nn.Module):
    """An untied embedding under twenty layers, a loss on the first layer only (under 1/8 of the
    tapped values), and a head only that loss reaches: the shallow pass, its cross terms and its own
    parameters."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(13, 16)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(20))
        self.low_head = torch.nn.Linear(16, 2)
        self.head = torch.nn.Linear(16, 13, bias=False)

    def losses(self, ids):
        h = self.embed(ids)
        outs = []
        for layer in self.layers:
            h = torch.tanh(layer(h))
            outs.append(h)
        logits = self.head(h)
        return [
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()),
            outs[3].pow(2).mean(),
            self.low_head(outs[0]).pow(2).mean(),  # reaches the embedding, layer 0 and low_head only
            (outs[-1] - outs[0]).abs().mean(),
        ]


@pytest.mark.parametrize("output_taps", [True, False])
def test_a_shallow_loss_runs_first_and_its_cross_terms_are_kept(output_taps, monkeypatch):
    from drivekd.distill import gramian as gm

    torch.manual_seed(3)
    model = Deep().double()
    ids = torch.randint(0, 13, (3, 5))
    params = [p for p in model.parameters()]
    rows = []
    for loss in model.losses(ids):
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        rows.append(
            torch.cat(
                [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
            )
        )
    jac = torch.stack(rows)
    passes = []
    real_vmap = torch.vmap
    monkeypatch.setattr(
        torch, "vmap", lambda f, **kw: lambda eye: (passes.append(eye.shape[0]), real_vmap(f, **kw)(eye))[1]
    )
    gramian = ParameterGramian([model], output_taps_from=0 if output_taps else 1 << 40)
    got = gramian.gram(model.losses(ids))
    assert passes == [1, 3]  # the low-head loss alone, then the other three
    assert torch.allclose(got, jac @ jac.T, rtol=1e-12, atol=1e-14), (got - jac @ jac.T).abs().max()
    passes.clear()
    monkeypatch.setattr(gm, "SHALLOW_SHARE", 0.0)  # no loss is shallow: one pass, the same matrix
    assert torch.allclose(gramian.gram(model.losses(ids)), got, rtol=1e-12, atol=1e-14) and passes == [4]


def test_output_taps_with_keyword_inputs_int32_ids_and_a_weight_frozen_after_hooking():
    torch.manual_seed(6)
    model = Deep().double()
    gramian = ParameterGramian([model], output_taps_from=0)
    model.layers[2].weight.requires_grad_(False)  # frozen after the taps were chosen: not counted
    ids = torch.randint(0, 13, (3, 5), dtype=torch.int32)

    def losses():
        h = model.embed(ids)
        outs = []
        for layer in model.layers:
            h = torch.tanh(layer(input=h))  # keyword input
            outs.append(h)
        return [model.head(h).pow(2).mean(), outs[4].sum() * 0.1, model.low_head(outs[0]).pow(2).mean()]

    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for loss in losses():
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        rows.append(
            torch.cat(
                [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
            )
        )
    jac = torch.stack(rows)
    got = gramian.gram(losses())
    assert torch.allclose(got, jac @ jac.T, rtol=1e-12, atol=1e-14), (got - jac @ jac.T).abs().max()


def test_outside_gram_the_taps_leave_an_ordinary_backward_unchanged():
    model, ids = _toy()
    sum(_toy_losses(model, ids).values()).backward()
    want = [None if p.grad is None else p.grad.clone() for p in model.parameters() if p.requires_grad]
    assert model.unused.weight.grad is None and model.embed.weight.grad is not None
    model.zero_grad(set_to_none=True)
    gramian = ParameterGramian([model])
    sum(_toy_losses(model, ids).values()).backward()
    got = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(got, want, strict=True))
    gramian.remove()
    assert not model.embed._forward_pre_hooks


def test_gram_matches_torchjd_autogram_on_an_untied_model():
    autogram = pytest.importorskip("torchjd.autogram")
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.GELU(), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    x = torch.randn(7, 5)

    def losses():
        out = model(x)
        return [out[:, 0].pow(2).mean(), (out[:, 1] - 1).abs().mean(), out.sum() * 0.1]

    engine = autogram.Engine(model, batch_dim=None)
    want = engine.compute_gramian(torch.stack(losses())).double()
    del engine  # its hooks go with it
    got = ParameterGramian([model]).gram(losses())
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), (got - want).abs().max()


def _exact_buffer_gram(monkeypatch):
    """The buffer path's Gram matrix in fp64: MKL's fp32 product over ~1M columns is off by up to ~6e-4
    relative (measured on the tiny student), the taps' fp64 blocks by ~2e-7; compared in fp64, the two
    paths differ only by the combination's rounding."""
    monkeypatch.setattr(aggregate, "gram_matrix", lambda stacked: stacked.double() @ stacked.double().T)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_aggregator_paths_give_the_same_gradients_amortised_and_resumed(strategy, monkeypatch):
    _exact_buffer_gram(monkeypatch)
    model, _ = _toy()
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(i)) for i in range(5)]

    def run(gram, *, resume_at=None):
        make = lambda: GradientAggregator(  # noqa: E731
            lambda: params, strategy, anchor="ce", seed=3, amortize_every=2, gram=gram, modules=lambda: [model]
        )
        agg, grads, stats = make(), [], []
        for step, ids in enumerate(batches):
            if step == resume_at:  # a resumed run: a fresh aggregator given the checkpointed state
                state = agg.state_dict()
                del agg
                agg = make()
                agg.load_state_dict(state)
            model.zero_grad(set_to_none=True)
            stats.append(agg.backward(_toy_losses(model, ids), _Single(), step))
            grads.append(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]))
        model.zero_grad(set_to_none=True)
        return grads, stats

    buffer, buffer_stats = run("buffer")
    modules, modules_stats = run("modules")
    resumed, _ = run("modules", resume_at=3)
    for a, b, c in zip(buffer, modules, resumed, strict=True):
        # fp64 weights, but the buffer path combines in fp32 (w32 @ rows.float()): fp32 rounding
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * a.abs().max()), (a - b).abs().max()
        assert torch.equal(b, c)
    if strategy != "sum":
        assert [bool(s) for s in modules_stats] == [True, False, True, False, True]  # every 2 steps
        for s, t in zip(buffer_stats, modules_stats, strict=True):
            assert s.keys() == t.keys() and all(s[k] == pytest.approx(t[k], rel=1e-9, abs=1e-12) for k in s)


def _distiller_gradients(d, batch, strategy, gram, step=5):
    """`.grad` of every trainable parameter after one aggregator backward of the distiller's losses."""
    d.aggregator = GradientAggregator(
        d.trainable, strategy, anchor="ce", seed=1, gram=gram, modules=lambda: [d.student.model, d.projections]
    )
    params = d.trainable()
    for p in params:
        p.grad = None
    stats = d.backward(d.objective(d.student.model, batch), _Single(), step)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    if d.aggregator.gramian is not None:
        d.aggregator.gramian.remove()
    return grads, stats


def _tiny_distiller(family, teacher, data_dir, tmp_path):
    """The tiny student of `family` with a live teacher, the `drive-kd` recipe at weights that put the
    signals' gradients at CE's scale (so the projections do something), and a batch of 4."""
    from drivekd.data.formats import load_split
    from drivekd.distill.engine import Distiller
    from drivekd.models.loading import load_backend
    from drivekd.train.config import DataConfig, DistillConfig, ModelConfig, TrainConfig

    student = load_backend(f"tiny-{family}-student")
    train = load_split(data_dir, "train")
    config = DistillConfig(
        model=ModelConfig(name=f"tiny-{family}-student"),
        teacher=str(teacher),
        recipe="drive-kd",
        data=DataConfig(path=str(data_dir), val_split=None),
        train=TrainConfig(output_dir=str(tmp_path / "run"), micro_batch_size=4),
    )
    d = Distiller(config, student, train)
    d.set_weights({"perception": 3e4, "reasoning": 1e4, "planning": 1e4})
    return student, d, student.build_batch(train[:4])


def _assert_same_gradients(want, got, want_stats, got_stats):
    # fp32 gradients: the two paths round differently (k backwards and an fp32 combination, or one
    # backward of sum w_i L_i); 1e-4 of the largest gradient entry is far above that, far below any
    # coefficient mistake
    scale = max(float(g.abs().max()) for g in want)
    worst = max(float((a - b).abs().max()) for a, b in zip(want, got, strict=True))
    assert worst <= 1e-4 * scale, (worst, scale)
    assert got_stats.keys() == want_stats.keys()
    for key in want_stats:
        assert got_stats[key] == pytest.approx(want_stats[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize(
    ("family", "strategies"),
    [("internvl", STRATEGIES), ("qwen25vl", ("agp", "pcgrad"))],
)
def test_distiller_gradients_equal_the_buffer_path_through_capture(
    family, strategies, data_dir, teacher_dir, qwen_teacher_dir, tmp_path, monkeypatch
):
    """The shipped drive-kd recipe through attention capture (live teacher), tied embeddings included."""
    _exact_buffer_gram(monkeypatch)
    teacher = teacher_dir if family == "internvl" else qwen_teacher_dir
    _, d, batch = _tiny_distiller(family, teacher, data_dir, tmp_path)
    for strategy in strategies:
        want, want_stats = _distiller_gradients(d, batch, strategy, "buffer")
        got, got_stats = _distiller_gradients(d, batch, strategy, "modules")
        _assert_same_gradients(want, got, want_stats, got_stats)


@pytest.mark.parametrize("shallow_share", [None, 0.9])
def test_output_taps_on_every_linear_give_the_buffer_paths_gradients_through_capture(
    shallow_share, data_dir, teacher_dir, tmp_path, monkeypatch
):
    """The tiny student's every Linear and its embedding tapped at their outputs (the embedding and
    head are tied: taken together); with a large shallow share the losses that reach less run in a
    first pass of their own."""
    from drivekd.distill import gramian as gm

    _exact_buffer_gram(monkeypatch)
    monkeypatch.setattr(gm, "OUTPUT_TAP_FROM", 0)
    student, d, batch = _tiny_distiller("internvl", teacher_dir, data_dir, tmp_path)
    want, want_stats = _distiller_gradients(d, batch, "agp", "buffer")
    probe = gm.ParameterGramian([student.model])
    linears = {id(m) for m in student.model.modules() if type(m) is torch.nn.Linear and m.weight.requires_grad}
    head, embedding = student.model.get_output_embeddings(), student.model.get_input_embeddings()
    assert head.weight is embedding.weight and id(head) in linears  # tied: both taken at their outputs
    assert probe._output_tapped == linears | {id(embedding)} and len(probe._output_tapped) > 20
    probe.remove()
    passes = []
    if shallow_share is not None:
        monkeypatch.setattr(gm, "SHALLOW_SHARE", shallow_share)
        real_vmap = torch.vmap
        monkeypatch.setattr(
            torch, "vmap", lambda f, **kw: lambda eye: (passes.append(eye.shape[0]), real_vmap(f, **kw)(eye))[1]
        )
    got, got_stats = _distiller_gradients(d, batch, "agp", "modules")
    assert len(passes) == (0 if shallow_share is None else 2) and sum(passes) in (0, 4)
    _assert_same_gradients(want, got, want_stats, got_stats)


class _Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """The most elements of any tensor an op makes (vmapped ops show their physical, k-batched size)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("gram", ["buffer", "modules"])
def test_the_modules_path_makes_no_k_by_p_buffer(gram):
    torch.manual_seed(5)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
    params = list(model.parameters())
    total = sum(p.numel() for p in params)  # 24,960
    x = torch.randn(2, 64)
    agg = GradientAggregator(lambda: params, "agp", anchor="ce", gram=gram, modules=lambda: [model])
    out = model(x)
    losses = {"ce": out[:, 0].pow(2).mean(), "a": out[:, 1].mean(), "b": -out[:, 2].mean(), "c": out.pow(2).mean()}
    with _Largest() as seen:
        agg.backward(losses, _Single(), 0)
    if gram == "buffer":
        assert seen.largest >= 4 * total
    else:  # one weight's k = 4 gradients (4 x 4,096) at most: less than even one whole gradient (P)
        assert 4 * 64 * 64 <= seen.largest < total


def test_gram_modules_refuses_what_it_cannot_do_at_config_load(tmp_path):
    from drivekd.errors import DriveKDError
    from drivekd.train.config import CombineConfig, DistillConfig, load_config

    assert CombineConfig().gram == "buffer"  # the modules path is exact but slower here (docs/results.md)
    f = tmp_path / "d.yaml"
    f.write_text(
        "model: {name: tiny-internvl-student}\nteacher: t\ndata: {path: d}\ntrain: {output_dir: o}\n"
        "combine: {gram: modules, project_per: step}\n"
    )
    with pytest.raises(DriveKDError, match="gram: modules cannot project per step") as e:
        load_config(DistillConfig, f)
    assert "\n" not in str(e.value)


def test_bench_step_names_the_default_gram_path_without_a_suffix():
    from drivekd.bench.step import figure_name, gram_paths
    from drivekd.train.config import CombineConfig

    # `agp` in `drivekd bench step` is what a config gets by default; the other path is `agp[NAME]`
    assert gram_paths()[0] == CombineConfig().gram == "buffer" and set(gram_paths()) == {"buffer", "modules"}
    assert figure_name("agp", "buffer") == "agp" and figure_name("agp", "modules") == "agp[modules]"
    assert figure_name("agp-amortized", "modules") == "agp-amortized[modules]"
