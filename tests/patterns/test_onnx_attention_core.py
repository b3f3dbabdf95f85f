"""onnx_attention_core: the opset-23 Attention(q, k, v, mask) op as an attention core."""

from __future__ import annotations

import onnx_graphsurgeon as gs
import pytest

from onnx_rewriter.matching import Refuse
from tests.patterns.graphs import HQ, Builder, D, node, reasons, result, run


def _attention(q_shape=("B", HQ, "S", D), mask=True, n_out=1, **attrs):
    b = Builder()
    q = b.input("q", list(q_shape))
    k, v = b.input("k", ["B", HQ, "S", D]), b.input("v", ["B", HQ, "S", D])
    m = b.input("mask", ["B", 1, "S", "S"], bool) if mask else None
    ins = [q, k, v] + ([m] if mask else [])
    out = b.op("Attention", *ins, n_out=n_out, **attrs)
    return b, q, k, v, m, out


def _rejected(b, y, *outputs):
    return reasons(run(b.graph(*(outputs or (y,)))), "attention_core", node(y))


def test_matches_with_default_scale():
    b, q, k, v, m, y = _attention()
    core = result(run(b.graph(y)), "attention_core", node(y))
    assert (core.q, core.k, core.v, core.out, core.mask) == (q, k, v, y, m)
    assert core.scale == pytest.approx(D ** -0.5)


def test_scale_attribute():
    b, q, k, v, m, y = _attention(scale=0.125)
    assert result(run(b.graph(y)), "attention_core", node(y)).scale == 0.125


def test_refuses_softcap():
    b, q, k, v, m, y = _attention(softcap=50.0)
    with pytest.raises(Refuse, match=r"soft-capping \(Attention softcap=50.0"):
        run(b.graph(y))


def test_3d_inputs():
    b, q, k, v, m, y = _attention(q_shape=("B", "S", HQ * D))
    assert _rejected(b, y) == ["onnx_attention_core: Attention: q, k, v are not 4-D [B, H, S, D] "
                               "(3-D inputs with q_num_heads are not recognized)"]


def test_in_op_cache():
    b, q, k, v, m, y = _attention()
    node(y).inputs.append(b.input("past_key", ["B", HQ, "P", D]))
    assert _rejected(b, y) == ["onnx_attention_core: Attention: past_key/past_value inputs (an in-op cache) "
                               "are not recognized"]


def test_nonpad_kv_seqlen():
    b, q, k, v, m, y = _attention()
    node(y).inputs.extend([gs.Variable.empty(), gs.Variable.empty(), b.input("nonpad_kv_seqlen", ["B"], "int64")])
    assert _rejected(b, y) == ["onnx_attention_core: Attention: nonpad_kv_seqlen input is not recognized"]


def test_extra_outputs_used():
    b, q, k, v, m, outs = _attention(n_out=2)
    y = outs[0]
    assert _rejected(b, y, y, b.op("Neg", outs[1])) == ["onnx_attention_core: Attention: extra outputs are used"]


def test_qk_matmul_output_mode():
    b, q, k, v, m, y = _attention(qk_matmul_output_mode=1)
    assert _rejected(b, y) == ["onnx_attention_core: Attention: qk_matmul_output_mode is not 0"]


def test_no_mask():
    b, q, k, v, m, y = _attention(mask=False)
    assert _rejected(b, y) == ["onnx_attention_core: Attention: no mask input"]


def test_is_causal_alone():
    b, q, k, v, m, y = _attention(mask=False, is_causal=1)
    assert _rejected(b, y) == ["onnx_attention_core: Attention: no mask input (is_causal=1 alone is not probed)"]


def test_is_causal_on_top_of_a_mask():
    b, q, k, v, m, y = _attention(is_causal=1)
    assert _rejected(b, y) == ["onnx_attention_core: Attention: is_causal=1 on top of a mask input"]


def test_no_scale_and_symbolic_head_size():
    b, q, k, v, m, y = _attention(q_shape=("B", HQ, "S", "D"))
    assert _rejected(b, y) == [
        "onnx_attention_core: Attention: no scale attribute and the head size is not static"]
