"""attention_layer: roped q, k (through repeat_kv) and v into the core, checked against each other.

Also covers the layer's helpers: the q/k norm in front of RoPE (patterns/_qk_norm.py) and the
per-token output check that looks through shape-keeping Reshapes (patterns/_same_shape.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.patterns.graphs import HKV, HQ, D, i64, layer, node, reasons, result, rope_table_mul, run


def _rejected(L):
    return reasons(run(L.graph()), "attention_layer", L.core.softmax)


def test_matches():
    L = layer()
    m = result(run(L.graph()), "attention_layer", L.core.softmax)
    assert (m.q, m.k, m.v, m.out, m.mask) == (L.q, L.k, L.v, L.core.out, L.mask)
    assert (m.num_q_heads, m.num_kv_heads, m.head_size, m.rotary_dim) == (HQ, HKV, D, D)
    assert m.scale == pytest.approx(D ** -0.5) and m.rope.cos is L.table.cos
    assert m.patterns == ["attention_core", "attention_layer", "repeat_kv", "rotate_half"]
    assert m.q_norm is None and m.k_norm is None


def test_core_not_recognized_names_the_core_reason():
    L = layer()
    L.core.softmax.attrs["axis"] = 1
    assert _rejected(L) == ["attention_layer: attention_core: attention: Softmax axis is 1, not the last "
                            f"at Softmax node '{L.core.softmax.name}'"]


def test_q_not_roped():
    L = layer()
    node(L.core.qk).inputs[0] = L.q
    assert _rejected(L) == ["attention_layer: q is not roped by a recognized RoPE (it is a graph input or constant)"]


def test_k_not_roped():
    L = layer()
    node(node(node(L.k_rep).inputs[0]).inputs[0]).inputs[0] = L.k
    assert _rejected(L) == ["attention_layer: k is not roped by a recognized RoPE (it is a graph input or constant)"]


def test_q_and_k_roped_by_different_tables():
    L = layer()
    other = rope_table_mul(L.b, L.positions)
    for mul, tab in ((L.k_rope.cos_mul, other.cos), (L.k_rope.sin_mul, other.sin)):
        node(mul).inputs[1] = L.b.op("Unsqueeze", tab, i64(1))
    assert _rejected(L) == ["attention_layer: q and k are roped with different cos/sin tables"]


def test_head_count_not_static():
    L = layer(q_shape=("B", "H", "S", D))
    assert _rejected(L) == ["attention_layer: head count or head size is not static (and positive) in the graph"]


def test_head_sizes_differ():
    L = layer(v_shape=("B", HKV, "S", D // 2))
    assert _rejected(L) == ["attention_layer: q, k and v head sizes differ"]


def test_k_and_v_heads_differ():
    L = layer(k_shape=("B", 1, "S", D))
    assert _rejected(L) == ["attention_layer: k has 1 heads but v has 2"]


def test_q_heads_not_a_multiple():
    L = layer(q_shape=("B", 3, "S", D))
    assert _rejected(L) == ["attention_layer: 3 q heads are not a multiple of 2 kv heads"]


def test_repeat_kv_on_one_side():
    L = layer()
    node(L.core.out).inputs[1] = L.v
    assert _rejected(L) == ["attention_layer: repeat_kv on only one of k and v"]


def test_repeat_kv_groups_differ():
    L = layer()
    L.k_rep.shape = ["B", 3 * HKV, "S", D]
    assert _rejected(L) == ["attention_layer: repeat_kv groups differ from 2"]


def test_gqa_without_repeat_kv():
    L = layer()
    node(L.core.kt).inputs[0] = L.k_rope.out
    node(L.core.out).inputs[1] = L.v
    assert _rejected(L) == ["attention_layer: 4 q heads attend to 2 kv heads without repeat_kv"]


def test_no_mask():
    L = layer()
    L.core.softmax.inputs[0] = L.core.scaled
    assert _rejected(L) == ["attention_layer: attention has no mask; the plugin is always causal"]


def test_kv_cache_on_one_side():
    L = layer()
    past = L.b.input("past_key_values.0.value", ["B", HKV, "P", D])
    cat = L.b.op("Concat", past, L.v, axis=-2, shape=["B", HKV, "T", D])
    node(node(node(L.v_rep).inputs[0]).inputs[0]).inputs[0] = cat
    L.b.outputs.append(cat)
    assert _rejected(L) == ["attention_layer: a KV cache Concat on only one of k and v"]


def test_kv_cache_is_looked_through():
    L = layer()
    for name, rep, new in (("key", L.k_rep, L.k_rope.out), ("value", L.v_rep, L.v)):
        past = L.b.input(f"past_key_values.0.{name}", ["B", HKV, "P", D])
        cat = L.b.op("Concat", past, new, axis=-2, shape=["B", HKV, "T", D])
        node(node(node(rep).inputs[0]).inputs[0]).inputs[0] = cat
        L.b.outputs.append(cat)
    m = result(run(L.graph()), "attention_layer", L.core.softmax)
    assert m.k is L.k and m.v is L.v and "kv_cache_concat" in m.patterns


def test_output_not_used():
    L = layer()
    node(node(L.y).inputs[0]).inputs[0] = L.b.input("other", ["B", HQ, "S", D])
    assert not L.core.out.outputs
    assert _rejected(L) == ["attention_layer: the attention output is not used"]


def test_output_not_transposed_back():
    L = layer()
    tr = node(node(L.y).inputs[0])
    tr.attrs["perm"] = [0, 1, 2, 3]
    assert _rejected(L) == [f"attention_layer: the attention output is read by Transpose '{tr.name}', not by "
                            "Transpose(0,2,1,3) back to [B, S, H, D]"]


def test_output_reshaped_to_another_width():
    L = layer()
    L.y.shape = ["B", "S", 2 * D]
    assert _rejected(L) == [f"attention_layer: the attention output is reshaped to ['B', 'S', {2 * D}], "
                            f"not [B, S, {HQ * D}]"]


def test_shape_keeping_reshape_is_looked_through():
    """TorchScript's Reshape(out, Concat(Gather(Shape(q), k)...)) keeps the shape (patterns/_same_shape.py)."""
    L = layer()
    b, out = L.b, L.core.out
    shape = b.op("Shape", L.q)
    parts = [b.op("Unsqueeze", b.op("Gather", shape, i64(k)), i64(0), shape=[1]) for k in range(4)]
    same = b.op("Reshape", out, b.op("Concat", *parts, axis=0))
    node(node(L.y).inputs[0]).inputs[0] = same
    assert result(run(L.graph()), "attention_layer", L.core.softmax).out is out


def test_reshape_reading_another_axis_is_not_looked_through():
    L = layer()
    b, out = L.b, L.core.out
    shape = b.op("Shape", L.q)
    parts = [b.op("Unsqueeze", b.op("Gather", shape, i64(k)), i64(0), shape=[1]) for k in (0, 2, 1, 3)]
    mixed = b.op("Reshape", out, b.op("Concat", *parts, axis=0))
    node(node(L.y).inputs[0]).inputs[0] = mixed
    assert _rejected(L) == [f"attention_layer: the attention output is read by Reshape '{node(mixed).name}', not by "
                            "Transpose(0,2,1,3) back to [B, S, H, D]"]


def _normed_layer(layout):
    """q and k normalized per head (gamma of head size) right before RoPE: Qwen3 ("bshd") or Gemma3 ("bhsd")."""
    L = layer()
    b = L.b
    for name, rope, heads in (("q", L.q_rope, HQ), ("k", L.k_rope, HKV)):
        shape = ["B", "S", heads, D] if layout == "bshd" else ["B", heads, "S", D]
        x = b.input(f"{name}_pre_norm", shape)
        rms = b.op("Reciprocal", b.op("Sqrt", b.op("Add", b.op("ReduceMean", b.op("Pow", x, np.float32(2.0)), i64(-1)),
                                                  np.float32(1e-6))))
        normed = b.op("Mul", b.op("Mul", x, rms), np.linspace(0.5, 1.5, D).astype(np.float32))
        if layout == "bshd":
            normed = b.op("Transpose", normed, perm=[0, 2, 1, 3])
        normed.shape = ["B", heads, "S", D]
        for n in (node(rope.hi), node(rope.lo), node(rope.cos_mul)):
            n.inputs[0] = normed
    return L


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_qk_norm_before_rope(layout):
    L = _normed_layer(layout)
    m = result(run(L.graph()), "attention_layer", L.core.softmax)
    for norm in (m.q_norm, m.k_norm):
        assert norm is not None and norm.layout == layout and norm.eps == pytest.approx(1e-6)
        np.testing.assert_allclose(norm.weight, np.linspace(0.5, 1.5, D), rtol=1e-6)
