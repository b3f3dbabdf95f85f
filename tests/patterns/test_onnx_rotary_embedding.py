"""onnx_rotary_embedding: the opset-23 RotaryEmbedding(x, Cos(f), Sin(f)) op, one table per distinct f."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_rewriter.matching import Refuse
from tests.patterns.graphs import INV_FREQ, Builder, D, i64, node, reasons, result, run


def _rotary(x_shape=("B", 4, "S", D), inv=INV_FREQ, form="mul", **attrs):
    b = Builder()
    x = b.input("x", list(x_shape))
    pos = b.input("position_ids", ["B", "S"], np.int64)
    if form == "mul":
        f = b.op("Mul", b.op("Cast", b.op("Unsqueeze", pos, i64(-1)), to=1), np.asarray(inv))
    else:
        mm = b.op("MatMul", np.asarray(inv).reshape(1, -1, 1), b.op("Cast", b.op("Unsqueeze", pos, i64(1)), to=1))
        f = b.op("Transpose", mm, perm=[0, 2, 1])
    cos, sin = b.op("Cos", f), b.op("Sin", f)
    out = b.op("RotaryEmbedding", x, cos, sin, **attrs)
    return b, x, pos, f, cos, sin, out


def _rejected(b, out):
    return reasons(run(b.graph(out)), "rope", node(out))


@pytest.mark.parametrize("form", ["mul", "matmul"])
def test_matches(form):
    b, x, pos, f, cos, sin, out = _rotary(form=form)
    rope = result(run(b.graph(out)), "rope", node(out))
    assert rope.x is x and rope.rotary_dim == D and rope.patterns == ["onnx_rotary_embedding"]
    np.testing.assert_allclose(rope.table.inv_freq, INV_FREQ, rtol=0)
    assert rope.table.positions is pos and rope.table.cos is cos and rope.table.attention_scaling == 1.0


def test_partial_rotary_by_attribute():
    b, x, pos, f, cos, sin, out = _rotary(x_shape=("B", 4, "S", 2 * D), rotary_embedding_dim=D)
    assert result(run(b.graph(out)), "rope", node(out)).rotary_dim == D


def test_one_table_per_angles_shared_by_layers():
    b, x, pos, f, cos, sin, out = _rotary()
    out2 = b.op("RotaryEmbedding", b.input("k", ["B", 2, "S", D]), b.op("Cos", f), b.op("Sin", f))
    ctx = run(b.graph(out, out2))
    assert result(ctx, "rope", node(out)).table is result(ctx, "rope", node(out2)).table


def test_scaled_table():
    b, x, pos, f, cos, sin, out = _rotary()
    node(out).inputs[1] = b.op("Mul", cos, np.float32(0.5))
    node(out).inputs[2] = b.op("Mul", np.float32(0.5), sin)
    assert result(run(b.graph(out)), "rope", node(out)).table.attention_scaling == 0.5


def test_refuses_interleaved():
    b, x, pos, f, cos, sin, out = _rotary(interleaved=1)
    with pytest.raises(Refuse, match=r"interleaved RoPE \(RotaryEmbedding interleaved=1\)"):
        run(b.graph(out))


def test_position_ids_input():
    b, x, pos, f, cos, sin, out = _rotary()
    node(out).inputs.append(pos)
    assert _rejected(b, out) == [
        "onnx_rotary_embedding: RotaryEmbedding with position_ids (gathered cos/sin caches) is not recognized"]


def test_x_not_4d():
    b, x, pos, f, cos, sin, out = _rotary(x_shape=("B", "S", 4 * D))
    assert _rejected(b, out) == ["onnx_rotary_embedding: RotaryEmbedding input is not [B, H, S, D]"]


def test_cos_and_sin_scaled_differently():
    b, x, pos, f, cos, sin, out = _rotary()
    node(out).inputs[1] = b.op("Mul", cos, np.float32(0.5))
    assert _rejected(b, out) == ["onnx_rotary_embedding: RotaryEmbedding: cos and sin scaled differently"]


def test_cos_input_not_a_cos():
    b, x, pos, f, cos, sin, out = _rotary()
    node(out).inputs[1] = sin
    assert _rejected(b, out) == [
        f"onnx_rotary_embedding: RotaryEmbedding cos: expected Cos, found Sin '{node(sin).name}'"]


def test_sin_input_not_a_sin():
    b, x, pos, f, cos, sin, out = _rotary()
    node(out).inputs[2] = cos
    assert _rejected(b, out) == [
        f"onnx_rotary_embedding: RotaryEmbedding sin: expected Sin, found Cos '{node(cos).name}'"]


def test_cos_and_sin_of_different_angles():
    b, x, pos, f, cos, sin, out = _rotary()
    node(sin).inputs[0] = b.input("g", ["B", "S", D // 2])
    assert _rejected(b, out) == ["onnx_rotary_embedding: RotaryEmbedding: cos and sin of different angles"]


def test_no_constant_inv_freq():
    b, x, pos, f, cos, sin, out = _rotary()
    node(f).inputs[1] = b.input("inv", [D // 2])
    assert _rejected(b, out) == ["onnx_rotary_embedding: rotary angles: no constant inv_freq operand"]


def test_angles_transpose_perm():
    b, x, pos, f, cos, sin, out = _rotary(form="matmul")
    node(f).attrs["perm"] = [0, 1, 2]
    assert _rejected(b, out) == ["onnx_rotary_embedding: rotary angles: Transpose is not (0,2,1)"]


def test_inv_freq_not_positive():
    b, x, pos, f, cos, sin, out = _rotary(inv=-INV_FREQ)
    assert _rejected(b, out) == ["onnx_rotary_embedding: rotary angles: inv_freq is not positive"]


def test_layers_scale_one_table_differently():
    b, x, pos, f, cos, sin, out = _rotary()
    k = b.input("k", ["B", 2, "S", D])
    out2 = b.op("RotaryEmbedding", k, b.op("Mul", cos, np.float32(0.5)), b.op("Mul", sin, np.float32(0.5)))
    assert reasons(run(b.graph(out, out2)), "rope", node(out2)) == [
        "onnx_rotary_embedding: RotaryEmbedding: layers scale one cos/sin table differently"]


def test_rotary_embedding_dim_differs_from_table():
    b, x, pos, f, cos, sin, out = _rotary(rotary_embedding_dim=D // 2)
    assert _rejected(b, out) == [
        f"onnx_rotary_embedding: RotaryEmbedding rotary_embedding_dim={D // 2} but the table has {D} dims"]


def test_head_size_differs_from_table():
    b, x, pos, f, cos, sin, out = _rotary(x_shape=("B", 4, "S", 2 * D))
    assert _rejected(b, out) == [
        f"onnx_rotary_embedding: RotaryEmbedding: head size {2 * D} but the table has {D} dims"]
