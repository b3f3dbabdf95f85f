"""rotate_half: Add(Mul(x, cos'), Mul(Concat(Neg(Slice(x, h:)), Slice(x, :h)), sin'))."""

from __future__ import annotations

import numpy as np
import pytest

from tests.patterns.graphs import Builder, D, i64, node, reasons, result, rope_table_mul, rotate_half, run


def _rope(x_shape=("B", 4, "S", D)):
    b = Builder()
    x = b.input("x", list(x_shape))
    pos = b.input("position_ids", ["B", "S"], np.int64)
    t = rope_table_mul(b, pos)
    return b, x, t, rotate_half(b, x, t)


def _ctx(b, r):
    return run(b.graph(r.out))


def _rejected(b, r):
    return reasons(_ctx(b, r), "rope", node(r.out))


def test_matches():
    b, x, t, r = _rope()
    rope = result(_ctx(b, r), "rope", node(r.out))
    assert rope.x is x and rope.rotary_dim == D and rope.patterns == ["rotate_half"]
    assert rope.table.cos is t.cos and rope.table.attention_scaling == 1.0


def test_operands_in_any_order():
    b, x, t, r = _rope()
    node(r.out).inputs.reverse()
    node(r.cos_mul).inputs.reverse()
    node(r.sin_mul).inputs.reverse()
    assert result(_ctx(b, r), "rope", node(r.out)).x is x


def test_scaled_table_sets_attention_scaling():
    b, x, t, r = _rope()
    for mul, tab in ((r.cos_mul, r.cos), (r.sin_mul, r.sin)):
        node(mul).inputs[1] = b.op("Mul", tab, np.float32(0.5))
    ctx = _ctx(b, r)
    table = result(ctx, "rope", node(r.out)).table
    assert table.attention_scaling == 0.5 and table.cos is t.cos and table.sin is t.sin
    # the rope_table stage's own result is not written into: the scaled table is the RoPE's own
    (shared,) = [m.result for m in ctx.matches["rope_table"].values()]
    assert shared.attention_scaling == 1.0 and shared is not table


def test_one_scaled_table_per_scale():
    """q and k (and every layer) roped through one scaled table share one table object, which
    attention_layer's identity check (q and k roped by the same table) relies on."""
    b = Builder()
    pos = b.input("position_ids", ["B", "S"], np.int64)
    t = rope_table_mul(b, pos)
    outs = []
    for name in ("q", "k"):
        r = rotate_half(b, b.input(name, ["B", 4, "S", D]), t)
        for mul, tab in ((r.cos_mul, r.cos), (r.sin_mul, r.sin)):
            node(mul).inputs[1] = b.op("Mul", tab, np.float32(0.5))
        outs.append(r.out)
    ctx = run(b.graph(*outs))
    q, k = (result(ctx, "rope", node(o)).table for o in outs)
    assert q is k and q.attention_scaling == 0.5


def test_cos_and_sin_scaled_differently():
    b, x, t, r = _rope()
    node(r.cos_mul).inputs[1] = b.op("Mul", r.cos, np.float32(0.5))
    assert _rejected(b, r) == ["rotate_half: rope: cos and sin scaled differently", "rope_interleaved: not interleaved"]


def test_add_of_two_muls_expected():
    b, x, t, r = _rope()
    node(r.cos_mul).op = "Sub"
    assert _rejected(b, r) == ["rotate_half: rope: Add of two Muls expected",
                               "rope_interleaved: interleaved rope: Add of two Muls expected"]


def test_no_recognized_cos_table_names_the_table_reason():
    b, x, t, r = _rope()
    node(t.sin).op = "Tanh"  # the table no longer matches: no Sin beside the Cos
    cos = node(t.cos).name
    assert _rejected(b, r)[0] == (
        "rotate_half: rope: neither Mul reads a recognized cos table (rope_table_matmul: rope table: no Sin beside "
        f"the Cos at Cos node '{cos}'; rope_table_mul: rope table: no Sin beside the Cos at Cos node '{cos}')")


def test_no_cos_table_at_all():
    b, x, t, r = _rope()
    node(r.cos_mul).inputs[1] = b.input("c", ["B", 1, "S", D])
    node(r.sin_mul).inputs[1] = b.input("s", ["B", 1, "S", D])
    assert _rejected(b, r)[0] == "rotate_half: rope: neither Mul reads a recognized cos table"


def test_other_mul_does_not_read_the_sin():
    b, x, t, r = _rope()
    node(r.sin_mul).inputs[1] = r.cos
    assert _rejected(b, r)[0] == "rotate_half: rope: the other Mul does not read the matching sin table"


def test_rotate_half_is_not_a_concat():
    b, x, t, r = _rope()
    node(r.rot).op = "Add"
    assert _rejected(b, r)[0] == "rotate_half: rope: rotate_half is not a Concat"


def test_concat_not_two_way_on_last_axis():
    b, x, t, r = _rope()
    node(r.rot).attrs["axis"] = 1
    assert _rejected(b, r)[0] == "rotate_half: rope: rotate_half Concat is not 2-way on the last axis"


def test_first_half_not_negated():
    b, x, t, r = _rope()
    node(r.rot).inputs[0] = r.hi
    assert _rejected(b, r)[0] == ("rotate_half: rope: first half of rotate_half: expected Neg, "
                                  f"found Slice '{node(r.hi).name}'")


def test_negated_half_not_a_slice():
    b, x, t, r = _rope()
    node(r.neg).inputs[0] = x
    assert _rejected(b, r)[0] == "rotate_half: rope: negated half: expected Slice, found a graph input or constant"


def test_second_half_not_a_slice():
    b, x, t, r = _rope()
    node(r.rot).inputs[1] = x
    assert _rejected(b, r)[0] == ("rotate_half: rope: second half of rotate_half: expected Slice, "
                                  "found a graph input or constant")


def test_slices_another_tensor():
    b, x, t, r = _rope()
    node(r.lo).inputs[0] = b.input("y", ["B", 4, "S", D])
    assert _rejected(b, r)[0] == "rotate_half: rope: rotate_half slices another tensor than the one multiplied by cos"


def test_slice_bounds_not_constant():
    b, x, t, r = _rope()
    node(r.hi).inputs[1] = b.input("start", [1], np.int64)
    assert _rejected(b, r)[0] == "rotate_half: rope: rotate_half Slice bounds are not constant"


def test_slices_step_two():
    b, x, t, r = _rope()
    node(r.lo).inputs[4] = b.const(i64(2))
    assert _rejected(b, r)[0] == "rotate_half: rope: rotate_half Slices are not on the last axis with step 1"


@pytest.mark.parametrize("which, bounds, reason", [
    ("lo", (0, 3), "lower half is [0:3], expected [0:4]"),
    ("hi", (3, 2**62), "upper half is [3:4611686018427387904], expected [4:8]"),
    ("hi", (4, 7), "upper half is [4:7], expected [4:8]"),
])
def test_half_bounds(which, bounds, reason):
    b, x, t, r = _rope()
    sl = node(getattr(r, which))
    sl.inputs[1], sl.inputs[2] = b.const(i64(bounds[0])), b.const(i64(bounds[1]))
    assert _rejected(b, r)[0] == f"rotate_half: rope: {reason}"


def test_x_wider_than_the_table():
    b, x, t, r = _rope(("B", 4, "S", 2 * D))
    assert _rejected(b, r)[0] == f"rotate_half: rope: x has {2 * D} dims but the table {D}"
