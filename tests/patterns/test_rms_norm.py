"""rms_norm: the RMSNorm core Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))), gamma excluded."""

from __future__ import annotations

import numpy as np
import pytest

from tests.patterns.graphs import Builder, i64, node, reasons, result, run


def _core(axes=(-1,)):
    b = Builder()
    x = b.input("x", ["B", "S", 16])
    sq = b.op("Pow", x, np.float32(2.0))
    mean = b.op("ReduceMean", sq, i64(*axes), keepdims=1)
    add = b.op("Add", mean, np.float32(1e-6))
    sqrt = b.op("Sqrt", add)
    rec = b.op("Reciprocal", sqrt)
    out = b.op("Mul", x, rec)
    return b, x, sq, mean, add, sqrt, rec, out


def _rejected(b, sq, *outputs):
    return reasons(run(b.graph(*outputs)), "rms_norm", node(sq))


def test_matches():
    b, x, sq, mean, add, sqrt, rec, out = _core()
    core = result(run(b.graph(out)), "rms_norm", node(sq))
    assert core.x is x and core.out is out and core.eps == pytest.approx(1e-6)
    assert core.nodes == [node(t) for t in (sq, mean, add, sqrt, rec, out)]


def test_div_form_and_cast_on_x():
    b, x, sq, mean, add, sqrt, rec, out = _core()
    node(rec).op = "Div"
    node(rec).inputs.insert(0, b.const(np.float32(1.0)))
    node(sq).inputs[0] = b.op("Cast", x, to=1)
    assert result(run(b.graph(out)), "rms_norm", node(sq)).x is x


def test_exponent_not_2():
    b, x, sq, mean, add, sqrt, rec, out = _core()
    node(sq).inputs[1] = b.const(np.float32(3.0))
    assert _rejected(b, sq, out) == ["rms_norm: rms_norm: Pow exponent is not 2"]


def test_square_read_by_another_op():
    b, x, sq, mean, add, sqrt, rec, out = _core()
    assert _rejected(b, sq, out, b.op("Neg", sq)) == ["rms_norm: rms_norm: x² is not only reduced by ReduceMean"]


def test_mean_over_another_axis():
    b, x, sq, mean, add, sqrt, rec, out = _core(axes=(1,))
    assert _rejected(b, sq, out) == ["rms_norm: rms_norm: ReduceMean is not over the last axis"]


def test_no_eps():
    b, x, sq, mean, add, sqrt, rec, out = _core()
    node(sqrt).inputs[0] = mean
    assert _rejected(b, sq, out) == ["rms_norm: rms_norm: no + eps"]


def test_eps_not_constant():
    b, x, sq, mean, add, sqrt, rec, out = _core()
    node(add).inputs[1] = b.input("eps", [])
    assert _rejected(b, sq, out) == ["rms_norm: rms_norm: eps is not a constant"]


def test_no_sqrt():
    b, x, sq, mean, add, sqrt, rec, out = _core()
    node(sqrt).op = "Exp"
    assert _rejected(b, sq, out) == ["rms_norm: rms_norm: no Sqrt"]


def test_no_reciprocal():
    b, x, sq, mean, add, sqrt, rec, out = _core()
    node(rec).op = "Neg"
    assert _rejected(b, sq, out) == ["rms_norm: rms_norm: no Reciprocal"]


def test_div_is_not_one_over_sqrt():
    b, x, sq, mean, add, sqrt, rec, out = _core()
    node(rec).op = "Div"
    node(rec).inputs.insert(0, b.const(np.float32(2.0)))
    assert _rejected(b, sq, out) == ["rms_norm: rms_norm: Div is not 1/sqrt"]


def test_rsqrt_has_other_users():
    b, x, sq, mean, add, sqrt, rec, out = _core()
    assert _rejected(b, sq, out, b.op("Neg", rec)) == ["rms_norm: rms_norm: rsqrt has other users"]


def test_rsqrt_multiplies_another_tensor():
    b, x, sq, mean, add, sqrt, rec, out = _core()
    node(out).inputs[0] = b.input("y", ["B", "S", 16])
    assert _rejected(b, sq, out) == ["rms_norm: rms_norm: rsqrt multiplies another tensor than x"]
