"""vit_attention: Transpose(MatMul(Softmax(q' k'^T * s + mask), v'), (1, 0, 2)) on [T, H, D], q/k through vit_rope."""

from __future__ import annotations

import numpy as np

from tests.patterns.graphs import node, reasons, result
from tests.patterns.vit_graphs import D, H, block, run


def _rejected(g):
    return reasons(run(g.graph()), "vit_attention", node(g.prob))


def test_matches():
    g = block()
    attn = result(run(g.graph()), "vit_attention", node(g.prob))
    assert attn.q is g.q_rope.out and attn.k is g.k_rope.out and attn.v is g.v and attn.out is g.out
    assert attn.mask is g.mask and attn.num_heads == H and attn.head_size == D
    assert attn.scale == np.float32(D ** -0.5)


def test_k_transpose_in_two_steps():
    g = block()
    kh = g.b.op("Transpose", g.k_rope.out, perm=[1, 0, 2])
    node(g.qk).inputs[1] = g.b.op("Transpose", kh, perm=[0, 2, 1])
    assert result(run(g.graph()), "vit_attention", node(g.prob)).k is g.k_rope.out


def test_mask_on_either_side_and_casts_around_softmax():
    g = block()
    node(g.scores).inputs.reverse()
    node(g.prob).inputs[0] = g.b.op("Cast", g.scores, to=1)
    assert result(run(g.graph()), "vit_attention", node(g.prob)).mask is g.mask


def test_softmax_not_on_last_axis():
    g = block()
    node(g.prob).attrs["axis"] = 0
    assert _rejected(g) == ["vit_attention: vit attention: Softmax is not over the last axis"]


def test_no_mask_add():
    g = block()
    node(g.prob).inputs[0] = g.scaled
    assert _rejected(g)[0].startswith("vit_attention: vit attention: scores + mask: expected Add, found Mul")


def test_add_without_scores():
    g = block()
    node(g.qk).op = "Gemm"
    assert _rejected(g) == ["vit_attention: vit attention: neither side of the Add is q·k^T"]


def test_q_not_transposed_to_heads_first():
    g = block()
    node(g.qh).attrs["perm"] = [0, 1, 2]
    assert _rejected(g) == ["vit_attention: vit attention: q' is not Transpose(1, 0, 2)"]


def test_k_side_not_a_transpose():
    g = block()
    node(g.qk).inputs[1] = g.k
    assert _rejected(g)[0].startswith("vit_attention: vit attention: k side of the scores: expected Transpose")


def test_k_transpose_with_wrong_perm():
    g = block()
    node(g.kt).attrs["perm"] = [0, 1, 2]
    assert _rejected(g) == ["vit_attention: vit attention: k^T is not Transpose(0, 2, 1)"]


def test_v_not_transposed():
    g = block()
    node(g.vh).attrs["perm"] = [1, 2, 0]
    assert _rejected(g) == ["vit_attention: vit attention: v' is not Transpose(1, 0, 2)"]


def test_output_not_transposed_back():
    g = block()
    node(g.out).attrs["perm"] = [0, 2, 1]
    assert _rejected(g) == ["vit_attention: vit attention: the output is not Transpose(1, 0, 2)"]


def test_output_used_before_transpose():
    g = block()
    g.b.outputs.append(g.b.op("Relu", g.pv))
    assert _rejected(g) == ["vit_attention: vit attention: P·v is not transposed back"]


def test_q_without_rope():
    g = block()
    node(g.qh).inputs[0] = g.q
    assert _rejected(g)[0].startswith("vit_attention: vit attention: q is not rotated by a 2-D RoPE (")


def test_q_and_k_with_different_angles():
    g = block()
    other = g.b.input("other", ["T", D // 2])
    cat = g.b.op("Concat", other, other, axis=-1)
    for mul, op in ((g.k_rope.cos_mul, "Cos"), (g.k_rope.sin_mul, "Sin")):
        unsq = node(node(mul).inputs[1])
        unsq.inputs[0] = g.b.op(op, cat)
    assert _rejected(g) == ["vit_attention: vit attention: q and k use different RoPE angles"]


def test_q_head_size_differs_from_rope():
    g = block()
    g.q_rope.out.shape = ["T", H, 2 * D]
    assert _rejected(g) == [f"vit_attention: vit attention: q has {2 * D} dims per head, the RoPE {D}"]
