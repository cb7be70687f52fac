import pytest

from drivekd.distill.reweight import LossReweighter


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
