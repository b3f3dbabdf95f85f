"""rope_interleaved: GPT-J's rotate_every_two is recognized only to be refused (the plugin rotates halves)."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_rewriter.matching import Refuse
from tests.patterns.graphs import Builder, D, i64, node, reasons, run


def _interleaved(step=2):
    """Add(Mul(x, cos), Mul(Reshape(Concat(Unsqueeze(Neg(x[..., 1::2])), Unsqueeze(x[..., ::2]))), sin))."""
    b = Builder()
    x = b.input("x", ["B", 4, "S", D])
    cos, sin = b.input("cos", ["B", 1, "S", D]), b.input("sin", ["B", 1, "S", D])
    odd = b.op("Slice", x, i64(1), i64(D), i64(-1), i64(step))
    even = b.op("Slice", x, i64(0), i64(D), i64(-1), i64(step))
    cat = b.op("Concat", b.op("Unsqueeze", b.op("Neg", odd), i64(-1)), b.op("Unsqueeze", even, i64(-1)), axis=-1)
    rot = b.op("Reshape", cat, i64(0, 0, 0, D))
    out = b.op("Add", b.op("Mul", x, cos), b.op("Mul", rot, sin))
    return b, cat, out


def test_refuses_pairs():
    b, cat, out = _interleaved()
    with pytest.raises(Refuse, match=r"interleaved \(GPT-J style\) RoPE rotates element pairs") as exc:
        run(b.graph(out))
    assert exc.value.node is node(cat)


def test_step_one_slices_are_not_interleaved():
    b, cat, out = _interleaved(step=1)
    assert reasons(run(b.graph(out)), "rope", node(out)) == [
        "rotate_half: rope: neither Mul reads a recognized cos table", "rope_interleaved: not interleaved"]


def test_add_of_two_muls_expected():
    b = Builder()
    x = b.input("x", ["B", 4, "S", D])
    out = b.op("Add", x, np.float32(1.0))
    assert reasons(run(b.graph(out)), "rope", node(out)) == [
        "rotate_half: rope: Add of two Muls expected", "rope_interleaved: interleaved rope: Add of two Muls expected"]
