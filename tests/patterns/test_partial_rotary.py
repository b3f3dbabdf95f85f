"""partial_rotary: Concat(rope(Slice(x, :R)), Slice(x, R:)) on the last axis (Phi-3)."""

from __future__ import annotations

import numpy as np

from tests.patterns.graphs import Builder, i64, node, reasons, result, rope_table_mul, rotate_half, run

R, HEAD = 8, 16  # rotary dims of a 16-wide head


def _partial():
    b = Builder()
    x = b.input("x", ["B", 4, "S", HEAD])
    pos = b.input("position_ids", ["B", "S"], np.int64)
    head = b.op("Slice", x, i64(0), i64(R), i64(-1), i64(1), shape=["B", 4, "S", R])
    tail = b.op("Slice", x, i64(R), i64(2**62), i64(-1), i64(1))
    r = rotate_half(b, head, rope_table_mul(b, pos))
    out = b.op("Concat", r.out, tail, axis=-1)
    return b, x, head, tail, out


def _rejected(b, out):
    return reasons(run(b.graph(out)), "rope_partial", node(out))


def test_matches():
    b, x, head, tail, out = _partial()
    rope = result(run(b.graph(out)), "rope_partial", node(out))
    assert rope.x is x and rope.rotary_dim == R and rope.patterns == ["rotate_half", "partial_rotary"]


def test_not_a_two_way_last_axis_concat():
    b, x, head, tail, out = _partial()
    node(out).attrs["axis"] = 1
    assert _rejected(b, out) == ["partial_rotary: partial rope: not a 2-way last-axis Concat"]


def test_first_part_not_a_rope():
    b, x, head, tail, out = _partial()
    node(out).inputs[0] = head
    assert _rejected(b, out) == ["partial_rotary: partial rope: first part is not a RoPE"]


def test_pass_through_not_a_slice():
    b, x, head, tail, out = _partial()
    node(out).inputs[1] = b.input("y", ["B", 4, "S", R])
    assert _rejected(b, out) == [
        "partial_rotary: partial rope: pass-through part: expected Slice, found a graph input or constant"]


def test_parts_slice_different_tensors():
    b, x, head, tail, out = _partial()
    node(tail).inputs[0] = b.input("y", ["B", 4, "S", HEAD])
    assert _rejected(b, out) == ["partial_rotary: partial rope: the two parts slice different tensors"]


def test_bounds_not_constant():
    b, x, head, tail, out = _partial()
    node(tail).inputs[1] = b.input("start", [1], np.int64)
    assert _rejected(b, out) == ["partial_rotary: partial rope: Slice bounds are not constant"]


def test_roped_part_not_the_first_r():
    b, x, head, tail, out = _partial()
    node(head).inputs[1], node(head).inputs[2] = b.const(i64(R)), b.const(i64(2 * R))
    assert _rejected(b, out) == [f"partial_rotary: partial rope: roped part is not [0:{R}]"]


def test_pass_through_starts_elsewhere():
    b, x, head, tail, out = _partial()
    node(tail).inputs[1] = b.const(i64(R + 2))
    assert _rejected(b, out) == [f"partial_rotary: partial rope: pass-through part does not start at {R}"]
