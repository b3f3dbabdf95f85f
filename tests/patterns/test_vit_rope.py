"""vit_rope: x·cos' + rotate_half(x)·sin' on [T, H, D], cos/sin = Cos/Sin(Concat(a, a))."""

from __future__ import annotations

import numpy as np

from tests.patterns.graphs import i64, node, reasons, result
from tests.patterns.vit_graphs import D, block, run


def _rejected(g, r):
    return reasons(run(g.graph()), "vit_rope", node(r.out))


def test_matches_q_and_k():
    g = block()
    ctx = run(g.graph())
    for r, x in ((g.q_rope, g.q), (g.k_rope, g.k)):
        rope = result(ctx, "vit_rope", node(r.out))
        assert rope.x is x and rope.angles is g.angles and rope.head_size == D and rope.out is r.out


def test_operands_in_any_order():
    g = block()
    for n in (node(g.q_rope.out), node(g.q_rope.cos_mul), node(g.q_rope.sin_mul)):
        n.inputs.reverse()
    assert result(run(g.graph()), "vit_rope", node(g.q_rope.out)).x is g.q


def test_add_of_two_muls_expected():
    g = block()
    node(g.q_rope.cos_mul).op = "Sub"
    assert _rejected(g, g.q_rope) == ["vit_rope: vit rope: Add of two Muls expected"]


def test_no_cos_table():
    g = block()
    node(g.cos).op = "Tan"
    assert _rejected(g, g.q_rope) == ["vit_rope: vit rope: neither Mul reads Cos(Concat(a, a))"]


def test_cos_of_another_concat():
    g = block()
    node(g.cat).inputs[1] = g.b.op("Mul", g.angles, np.float32(2))
    assert _rejected(g, g.q_rope) == ["vit_rope: vit rope: neither Mul reads Cos(Concat(a, a))"]


def test_sin_of_other_angles():
    g = block()
    other = g.b.input("other", ["T", D // 2])
    node(g.q_rope.sin_mul).inputs[1] = g.b.op("Unsqueeze", g.b.op("Sin", g.b.op("Concat", other, other, axis=-1)),
                                              i64(1))
    assert _rejected(g, g.q_rope) == ["vit_rope: vit rope: the other Mul does not read Sin of the same angles"]


def test_rotate_half_of_another_tensor():
    g = block()
    node(g.q_rope.lo).inputs[0] = g.k
    assert _rejected(g, g.q_rope) == ["vit_rope: vit rope: rotate_half slices another tensor than x"]


def test_rotate_half_concat_on_wrong_axis():
    g = block()
    node(g.q_rope.rot).attrs["axis"] = 0
    assert _rejected(g, g.q_rope) == ["vit_rope: vit rope: rotate_half Concat is not 2-way on the last axis"]


def test_rotate_half_without_neg():
    g = block()
    node(g.q_rope.rot).inputs[0] = g.q_rope.hi
    assert _rejected(g, g.q_rope)[0].startswith("vit_rope: vit rope: first half of rotate_half: expected Neg")


def test_slices_on_another_axis():
    g = block()
    node(g.q_rope.lo).inputs[3] = g.b.const(i64(1))
    assert _rejected(g, g.q_rope) == ["vit_rope: vit rope: rotate_half Slices are not on the last axis with step 1"]


def test_halves_swapped():
    g = block()
    node(g.q_rope.lo).inputs[1], node(g.q_rope.lo).inputs[2] = g.b.const(i64(D // 2)), g.b.const(i64(D))
    assert _rejected(g, g.q_rope) == ["vit_rope: vit rope: halves [4:8] and [4:4611686018427387904] do not split "
                                      "the head in two"]


def test_angles_width_must_be_half_the_head():
    g = block()
    g.angles.shape = ["T", D]
    assert _rejected(g, g.q_rope) == [f"vit_rope: vit rope: {D} angles per patch for a head of {D}"]
