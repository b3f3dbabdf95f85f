"""attention_core: MatMul(Softmax(MatMul(q, k^T) * scale + mask), v), eager and sdpa forms."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_rewriter.matching import Refuse
from tests.patterns.graphs import HKV, HQ, Builder, D, attention_core, node, reasons, result, run


def _core(mask=True):
    b = Builder()
    q = b.input("q", ["B", HQ, "S", D])
    k = b.input("k", ["B", HQ, "S", D])
    v = b.input("v", ["B", HQ, "S", D])
    m = b.input("mask", ["B", 1, "S", "S"]) if mask else None
    return b, q, k, v, m, attention_core(b, q, k, v, m)


def _rejected(b, c, *outputs):
    return reasons(run(b.graph(*(outputs or (c.out,)))), "attention_core", c.softmax)


def test_matches_eager():
    b, q, k, v, m, c = _core()
    core = result(run(b.graph(c.out)), "attention_core", c.softmax)
    assert (core.q, core.k, core.v, core.out, core.mask) == (q, k, v, c.out, m)
    assert core.scale == pytest.approx(D ** -0.5)


def test_matches_sdpa_split_scale_and_nan_guard():
    """sqrt(s) on q and on k^T, mask on the other side of the Add, Where(IsNaN(p), 0, p) after Softmax."""
    b, q, k, v, m, c = _core()
    half = np.float32(D ** -0.25)
    node(c.qk).inputs = [b.op("Mul", q, half), b.op("Mul", half, c.kt)]
    node(c.scores).inputs = [m, c.qk]
    guarded = b.op("Where", b.op("IsNaN", c.prob), np.float32(0.0), c.prob)
    node(c.out).inputs[0] = guarded
    core = result(run(b.graph(c.out)), "attention_core", c.softmax)
    assert core.q is q and core.mask is m and core.scale == pytest.approx(D ** -0.5)


def test_matches_division_by_a_scale_and_casts():
    b, q, k, v, m, c = _core()
    node(c.scaled).op = "Div"
    node(c.scaled).inputs[1] = b.const(np.float32(D ** 0.5))
    c.softmax.inputs[0] = b.op("Cast", c.scores, to=1)
    node(c.out).inputs[0] = b.op("Cast", c.prob, to=1)
    assert result(run(b.graph(c.out)), "attention_core", c.softmax).scale == pytest.approx(D ** -0.5)


def test_no_mask():
    b, q, k, v, m, c = _core(mask=False)
    assert result(run(b.graph(c.out)), "attention_core", c.softmax).mask is None


def test_softmax_axis():
    b, q, k, v, m, c = _core()
    c.softmax.attrs["axis"] = 1
    assert _rejected(b, c) == ["attention_core: attention: Softmax axis is 1, not the last"]


def test_add_without_scores():
    b, q, k, v, m, c = _core()
    node(c.scores).inputs[0] = b.input("other", ["B", HQ, "S", "S"])
    assert _rejected(b, c) == ["attention_core: attention: Softmax input is an Add but neither side is q·k^T"]


def test_refuses_soft_capping():
    b, q, k, v, m, c = _core()
    node(c.scores).inputs[0] = b.op("Mul", b.op("Tanh", b.op("Mul", c.scaled, np.float32(0.02))), np.float32(50.0))
    with pytest.raises(Refuse, match=r"attention logit soft-capping \(Tanh on the scores"):
        run(b.graph(c.out))


def test_scores_not_a_matmul():
    b, q, k, v, m, c = _core(mask=False)
    node(c.scaled).inputs[0] = b.input("s", ["B", HQ, "S", "S"])
    assert _rejected(b, c) == ["attention_core: attention scores: expected MatMul, found a graph input or constant"]


def test_k_side_not_k_transposed():
    b, q, k, v, m, c = _core()
    node(c.kt).attrs["perm"] = [0, 2, 1, 3]
    assert _rejected(b, c) == [
        "attention_core: attention: k side of the scores is not k^T (k_transpose_4d: k^T: perm is not (0,1,3,2) "
        f"at Transpose node '{node(c.kt).name}')"]


def test_nan_guard_where_without_isnan():
    b, q, k, v, m, c = _core()
    node(c.out).inputs[0] = b.op("Where", b.input("cond", ["B", HQ, "S", "S"], np.bool_), np.float32(0.0), c.prob)
    assert _rejected(b, c) == ["attention_core: attention: Where after Softmax is not a NaN guard"]


def test_nan_guard_writes_nonzero():
    b, q, k, v, m, c = _core()
    node(c.out).inputs[0] = b.op("Where", b.op("IsNaN", c.prob), np.float32(1.0), c.prob)
    assert _rejected(b, c) == ["attention_core: attention: NaN guard does not write 0"]


def test_softmax_output_not_multiplied_by_v():
    b, q, k, v, m, c = _core()
    node(c.out).inputs[0] = b.input("p", ["B", HQ, "S", "S"])
    y = b.op("Neg", c.prob)
    assert _rejected(b, c, y) == ["attention_core: attention: Softmax output does not reach a MatMul with v"]


def test_gqa_shapes_do_not_matter_here():
    b = Builder()
    q, k = b.input("q", ["B", HQ, "S", D]), b.input("k", ["B", HKV, "S", D])
    c = attention_core(b, q, k, b.input("v", ["B", HKV, "S", D]), b.input("mask", ["B", 1, "S", "S"]))
    assert result(run(b.graph(c.out)), "attention_core", c.softmax).k is k
