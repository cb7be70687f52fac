"""The Gram-space combiner against slow, explicit vector implementations of the same formulas."""

import pytest
import torch

from drivekd.distill import combination_coefficients, combine_gradients, gradient_stats


def proj(u, v):
    d = torch.dot(u, v)
    return u - d / torch.dot(v, v) * v if d < 0 else u


def explicit(grads, strategy, anchor="ce", order=None):
    names = list(grads)
    if strategy == "sum":
        return sum(grads.values())
    if strategy == "pcgrad":
        seq = order or names
        out = []
        for n in seq:
            g = grads[n].clone()
            for m in seq:
                if m != n:
                    g = proj(g, grads[m])
            out.append(g)
        return sum(out)
    gs = grads[anchor]
    tasks = [n for n in (order or names) if n != anchor]
    if not tasks:
        return gs
    if strategy == "agp-stage2":
        u = {c: gs + grads[c] for c in tasks}
    elif strategy == "agp-normalized":
        u = {c: gs / len(tasks) + proj(grads[c], gs) for c in tasks}
    else:
        u = {c: gs + proj(grads[c], gs) for c in tasks}
    if strategy == "agp-stage1":
        return sum(u.values())
    total = 0
    for c in tasks:
        v = u[c]
        for o in tasks:
            if o != c:
                v = proj(v, u[o])
        total = total + v
    return total


STRATS = ["sum", "pcgrad", "agp", "agp-stage1", "agp-stage2", "agp-normalized"]


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("seed", range(25))
def test_matches_explicit_on_random_vectors(strategy, seed):
    g = torch.Generator().manual_seed(seed)
    k = 2 + seed % 4
    dim = 3 if seed % 2 else 257
    grads = {n: torch.randn(dim, generator=g, dtype=torch.float64) for n in ["ce", *[f"d{i}" for i in range(k - 1)]]}
    order = [list(grads)[i] for i in torch.randperm(k, generator=g).tolist()]
    got = combine_gradients(grads, strategy, order=order)
    want = explicit(grads, strategy, order=order)
    assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()


def test_hand_computed_2d():
    gs = torch.tensor([1.0, 0.0], dtype=torch.float64)
    gc = torch.tensor([-1.0, 1.0], dtype=torch.float64)  # conflicts with the anchor
    out = combine_gradients({"ce": gs, "perception": gc}, "agp")
    # stage 1: proj(gc, gs) = gc - (-1/1) gs = (0, 1); u = gs + (0, 1) = (1, 1); one capability: no stage 2
    assert torch.allclose(out, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(
        combine_gradients({"ce": gs, "perception": gc}, "sum"), torch.tensor([0.0, 1.0], dtype=torch.float64)
    )
    # pcgrad is symmetric: gs also gives way to gc
    pc = combine_gradients({"ce": gs, "perception": gc}, "pcgrad")
    want = torch.tensor([0.0, 1.0], dtype=torch.float64) + (gs - (-1 / 2) * gc)
    assert torch.allclose(pc, want)


def test_hand_computed_3d_stage2():
    gs = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    ga = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    gb = torch.tensor([0.0, -2.0, 1.0], dtype=torch.float64)
    # stage 1 leaves both (no conflict with gs): ua = (1,1,0), ub = (1,-2,1); <ua,ub> = -1 < 0
    # va = ua - (-1/6) ub = (7/6, 4/6, 1/6); vb = ub - (-1/2) ua = (3/2, -3/2, 1)
    out = combine_gradients({"ce": gs, "a": ga, "b": gb}, "agp", order=["a", "b"])
    assert torch.allclose(out, torch.tensor([7 / 6 + 1.5, 4 / 6 - 1.5, 1 / 6 + 1.0], dtype=torch.float64))


def test_invariants():
    g = torch.Generator().manual_seed(0)
    gs, gc = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    assert torch.equal(combine_gradients({"ce": gs}, "agp"), gs)  # no distillation terms
    assert torch.allclose(combine_gradients({"ce": gs, "c": gc}, "agp"), gs + proj(gc, gs))
    grads = {"ce": gs, "c": gc, "d": -gc}
    assert torch.allclose(combine_gradients(grads, "sum"), gs)
    # stage 1 never changes the anchor: its component along gs is at least |gs|^2 per capability
    w = combination_coefficients(
        torch.stack(list(grads.values())) @ torch.stack(list(grads.values())).T, list(grads), "agp-stage1"
    )
    assert w[0] >= 2 - 1e-12


def test_generator_and_order_are_reproducible():
    grads = {
        n: torch.randn(20, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(["ce", "a", "b", "c"])
    }
    a = combine_gradients(grads, "agp", generator=torch.Generator().manual_seed(3))
    b = combine_gradients(grads, "agp", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown strategy"):
        combine_gradients(grads, "magic")
    with pytest.raises(ValueError, match="anchor"):
        combine_gradients({"a": grads["a"]}, "agp")


def test_gradient_stats():
    gram = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 4.0, 2.0], [0.0, 2.0, 1.0]])
    s = gradient_stats(gram, ["ce", "a", "b"])
    assert s["conflict_rate"] == pytest.approx(1 / 3)
    assert s["cos/ce~a"] == pytest.approx(-0.5)
    assert s["cos/a~b"] == pytest.approx(1.0)


class _Single:
    """The few Accelerator members the aggregator uses, for one process."""

    num_processes = 1

    @staticmethod
    def backward(loss):
        loss.backward()


def _losses(model, x):
    out = model(x)
    return {"ce": out[:, 0].pow(2).mean(), "perception": (out[:, 1] - 1).pow(2).mean(), "planning": -out.sum() * 0.1}


def _per_loss_gradients(model, x):
    """Each loss's flattened gradient by its own backward (the reference); leaves no .grad behind."""
    params = list(model.parameters())
    grads = {}
    for name in _losses(model, x):
        model.zero_grad(set_to_none=True)
        _losses(model, x)[name].backward()
        grads[name] = torch.cat([p.grad.reshape(-1) for p in params])
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("strategy", STRATS)
def test_aggregator_writes_the_explicit_combination_into_the_gradients(strategy):
    from drivekd.distill.aggregate import GradientAggregator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(6, 5)
    params = list(model.parameters())
    # reference: each loss's gradient by its own backward, flattened, combined by the explicit formulas
    grads = {name: g.double() for name, g in _per_loss_gradients(model, x).items()}
    seed, step = 3, 7
    aggregator = GradientAggregator(lambda: params, strategy, anchor="ce", seed=seed)
    stats = aggregator.backward(_losses(model, x), _Single(), step)
    got = torch.cat([p.grad.reshape(-1) for p in params]).double()
    order_generator = torch.Generator().manual_seed(seed * 1_000_003 + step)  # the aggregator's draw
    want = combine_gradients(grads, strategy, generator=order_generator)
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    if strategy != "sum":  # sum is one plain backward: nothing to log
        assert set(stats) >= {"coef/ce", "coef/perception", "coef/planning", "conflict_rate"}
        assert aggregator.coefficients is not None


def test_aggregator_amortises_and_sums_a_step_before_projecting():
    from drivekd.distill.aggregate import GradientAggregator

    torch.manual_seed(1)
    model = torch.nn.Linear(5, 3)
    params = list(model.parameters())
    xs = [torch.randn(4, 5) for _ in range(3)]
    amortised = GradientAggregator(lambda: params, "agp", anchor="ce", amortize_every=2)
    amortised.backward(_losses(model, xs[0]), _Single(), 0)
    first = amortised.coefficients.clone()
    model.zero_grad(set_to_none=True)
    assert amortised.backward(_losses(model, xs[1]), _Single(), 1) == {}  # reuses step 0's coefficients
    reused = torch.cat([p.grad.reshape(-1) for p in params])
    model.zero_grad(set_to_none=True)
    losses = _losses(model, xs[1])
    sum(float(w) * losses[n] for w, n in zip(first, losses, strict=True)).backward()
    assert torch.allclose(reused, torch.cat([p.grad.reshape(-1) for p in params]), atol=1e-6)
    # project_per step: two micro-batches' task gradients summed, combined once in before_step
    model.zero_grad(set_to_none=True)
    per_step = GradientAggregator(lambda: params, "agp", anchor="ce", project_per="step")
    for x in xs[:2]:
        assert per_step.backward(_losses(model, x), _Single(), 0) == {}
    assert all(p.grad is None for p in params)
    per_step.before_step(_Single(), 0)
    got = torch.cat([p.grad.reshape(-1) for p in params]).double()
    summed = {}
    for x in xs[:2]:
        for name in ("ce", "perception", "planning"):
            loss = _losses(model, x)[name]
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)]).double()
            summed[name] = summed.get(name, 0) + g
    want = combine_gradients(summed, "agp", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(got, want, atol=1e-6)


def test_gram_in_blocks_equals_the_whole_product(monkeypatch):
    from drivekd.distill import aggregate

    monkeypatch.setattr(aggregate, "GRAM_CHUNK", 7)  # several blocks and a short last one
    a = torch.randn(4, 45, dtype=torch.float32)
    assert torch.allclose(aggregate.gram_matrix(a), a @ a.T, atol=1e-5)
    b = a.to(torch.bfloat16)
    assert torch.allclose(aggregate.gram_matrix(b), b.float() @ b.float().T, atol=1e-4)


def test_bfloat16_task_buffers_give_the_combination_of_rounded_gradients():
    from drivekd.distill.aggregate import GradientAggregator

    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(6, 5)
    params = list(model.parameters())
    # what a bf16 buffer holds: each task gradient rounded to bf16
    grads = {name: g.to(torch.bfloat16).double() for name, g in _per_loss_gradients(model, x).items()}
    aggregator = GradientAggregator(lambda: params, "agp", anchor="ce", seed=0, buffer_dtype=torch.bfloat16)
    aggregator.backward(_losses(model, x), _Single(), 5)
    got = torch.cat([p.grad.reshape(-1) for p in params]).double()
    assert all(p.grad.dtype == torch.float32 for p in params)
    want = combine_gradients(grads, "agp", generator=torch.Generator().manual_seed(5))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_task_gradients_land_in_the_buffer_and_earlier_gradients_are_kept():
    from drivekd.distill.aggregate import GradientAggregator

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(6, 5)
    params = list(model.parameters())
    want = list(_per_loss_gradients(model, x).values())
    earlier = [torch.full_like(p, 0.5) for p in params]  # an earlier micro-batch's accumulated gradient
    for p, g in zip(params, earlier, strict=True):
        p.grad = g
    for dtype in (None, torch.bfloat16):  # in place (the parameters' dtype) and copied (bf16)
        aggregator = GradientAggregator(lambda: params, "agp", anchor="ce", buffer_dtype=dtype)
        stacked = aggregator._task_gradients(_losses(model, x))
        tol = 1e-6 if dtype is None else 1e-2
        assert all(torch.allclose(stacked[i].float(), want[i], atol=tol) for i in range(3))
        assert all(p.grad is g and torch.all(g == 0.5) for p, g in zip(params, earlier, strict=True))


@pytest.mark.parametrize("strategy", ["agp", "agp-stage1", "agp-stage2", "agp-normalized"])
def test_a_signal_absent_from_the_batch_is_no_task(strategy):
    # `mixing: identity` and a batch without planning questions: the planning loss and its gradient
    # are exactly zero. AGP must give what it gives without that signal, not count the anchor again.
    g = torch.randn(3, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    present = g @ g.T
    names = ["ce", "perception", "reasoning"]
    absent = torch.zeros(4, 4, dtype=torch.float64)
    absent[:3, :3] = present
    order = ["perception", "reasoning"]
    with_zero = combination_coefficients(absent, [*names, "planning"], strategy, order=[*order, "planning"])
    without = combination_coefficients(present, names, strategy, order=order)
    assert torch.allclose(with_zero[:3], without) and with_zero[3] == 0
    stats = gradient_stats(absent, [*names, "planning"])
    assert stats["conflict_rate"] == gradient_stats(present, names)["conflict_rate"]


def test_amortised_coefficients_are_not_kept_when_a_signal_was_absent():
    # coefficients computed on a batch without planning give planning weight 0: reused for the next
    # amortised steps they would switch planning off, so the next step computes its own
    from drivekd.distill.aggregate import GradientAggregator

    torch.manual_seed(1)
    model = torch.nn.Linear(5, 3)
    params = list(model.parameters())
    agg = GradientAggregator(lambda: params, "agp", anchor="ce", amortize_every=4)
    absent = {**_losses(model, torch.randn(4, 5)), "planning": 0.0 * model(torch.randn(4, 5)).sum()}
    assert agg.backward(absent, _Single(), 0) != {} and agg.coefficients is None
    model.zero_grad(set_to_none=True)
    stats = agg.backward(_losses(model, torch.randn(4, 5)), _Single(), 1)
    assert "coef/planning" in stats and stats["coef/planning"] > 0 and agg.coefficients is not None
