"""qk_rmsnorm: Mul(gamma, RMSNorm core(x)) with a 1-D gamma, or one opset-23 RMSNormalization."""

from __future__ import annotations

import numpy as np
import pytest

from tests.patterns.graphs import Builder, D, i64, node, reasons, result, run

GAMMA = np.linspace(0.5, 1.5, D).astype(np.float32)


def _norm(gamma=GAMMA):
    b = Builder()
    x = b.input("x", ["B", "S", 4, D])
    sq = b.op("Pow", x, np.float32(2.0))
    rms = b.op("Reciprocal", b.op("Sqrt", b.op("Add", b.op("ReduceMean", sq, i64(-1)), np.float32(1e-6))))
    core = b.op("Mul", x, rms)
    y = b.op("Mul", core, gamma)
    return b, x, core, y


def _op(scale=True, axis=-1, x_shape=("B", "S", 4, D)):
    b = Builder()
    x = b.input("x", list(x_shape))
    y = b.op("RMSNormalization", x, *([GAMMA] if scale else []), axis=axis, epsilon=1e-5)
    return b, x, y


def _rejected(b, y):
    return reasons(run(b.graph(y)), "qk_norm", node(y))


def test_matches_gamma_times_core():
    b, x, core, y = _norm()
    norm = result(run(b.graph(y)), "qk_norm", node(y))
    np.testing.assert_array_equal(norm.weight, GAMMA)
    assert norm.x is x and norm.eps == pytest.approx(1e-6) and norm.layout == "bshd"


def test_matches_rmsnormalization_op():
    b, x, y = _op()
    norm = result(run(b.graph(y)), "qk_norm", node(y))
    np.testing.assert_array_equal(norm.weight, GAMMA)
    assert norm.x is x and norm.eps == pytest.approx(1e-5)


def test_mul_without_constant():
    b, x, core, y = _norm()
    node(y).inputs[1] = b.input("g", [D])
    assert _rejected(b, y) == ["qk_rmsnorm: qk_norm: Mul has no constant operand"]


@pytest.mark.parametrize("gamma", [np.float32(2.0), np.ones((4, D), np.float32)])
def test_constant_is_not_a_1d_gamma(gamma):
    b, x, core, y = _norm(gamma)
    assert _rejected(b, y) == [
        f"qk_rmsnorm: qk_norm: constant operand of shape {list(np.shape(gamma))} is not a 1-D gamma"]


def test_gamma_times_something_else():
    b, x, core, y = _norm()
    node(y).inputs[0] = x
    assert _rejected(b, y) == ["qk_rmsnorm: qk_norm: gamma multiplies something that is not an RMSNorm core "
                               "(it is a graph input or constant)"]


def test_rmsnormalization_without_scale():
    b, x, y = _op(scale=False)
    assert _rejected(b, y) == ["qk_rmsnorm: qk_norm: RMSNormalization without scale"]


def test_rmsnormalization_scale_not_constant():
    b, x, y = _op()
    node(y).inputs[1] = b.input("g", [D])
    assert _rejected(b, y) == ["qk_rmsnorm: qk_norm: RMSNormalization scale is not a constant 1-D gamma"]


def test_rmsnormalization_axis_not_last():
    b, x, y = _op(axis=2)
    assert _rejected(b, y) == ["qk_rmsnorm: qk_norm: RMSNormalization axis 2 is not the last"]


def test_rmsnormalization_last_axis_by_index():
    b, x, y = _op(axis=3)
    assert result(run(b.graph(y)), "qk_norm", node(y)).x is x
