"""numpy ViTAttentionPlugin: attention within cu_seqlens segments only, as the runtime's plugin."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_rewriter.reference.ops import reference_evaluator
from onnx_rewriter.reference.vit_attention import vit_attention

H, D = 2, 8


def _qkv(t, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((t, H, D)).astype(np.float32) for _ in range(3)]


def _softmax_attention(q, k, v, scale):
    s = np.einsum("thd,shd->hts", q, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), v)


def test_each_segment_is_plain_bidirectional_attention():
    q, k, v = _qkv(7)
    out = vit_attention(q, k, v, np.array([0, 3, 7], np.int32), np.zeros(4, np.int32), num_heads=H, head_size=D)
    scale = D ** -0.5
    np.testing.assert_allclose(out[:3], _softmax_attention(q[:3], k[:3], v[:3], scale), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[3:], _softmax_attention(q[3:], k[3:], v[3:], scale), rtol=1e-5, atol=1e-6)
    # a token is not causal: the first token sees the later ones of its segment
    assert not np.allclose(out[0], v[0])


def test_tokens_of_other_segments_do_not_leak():
    q, k, v = _qkv(6)
    cu = np.array([0, 2, 6], np.int32)
    base = vit_attention(q, k, v, cu, np.zeros(4, np.int32), num_heads=H, head_size=D)
    v2 = v.copy()
    v2[3:] += 5.0  # change only the second segment
    moved = vit_attention(q, k, v2, cu, np.zeros(4, np.int32), num_heads=H, head_size=D)
    assert np.array_equal(base[:2], moved[:2])
    assert not np.allclose(base[2:], moved[2:])


def test_attention_scale_attribute_is_used():
    q, k, v = _qkv(4)
    cu = np.array([0, 4], np.int32)
    out = vit_attention(q, k, v, cu, np.zeros(4, np.int32), num_heads=H, head_size=D, attention_scale=0.05)
    np.testing.assert_allclose(out, _softmax_attention(q, k, v, 0.05), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cu, carrier, message", [
    ([0, 3, 6], 2, "a segment of 3 tokens exceeds max_seqlen_carrier [2]"),
    ([0, 3, 5], 4, "do not split 6 tokens"),
    ([1, 6], 8, "do not split 6 tokens"),
])
def test_bad_segments_are_errors(cu, carrier, message):
    q, k, v = _qkv(6)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        vit_attention(q, k, v, np.array(cu, np.int32), np.zeros(carrier, np.int32), num_heads=H, head_size=D)


@pytest.mark.parametrize("domain", ["trt", "trt_edgellm"])
def test_registered_for_the_reference_evaluator(domain):
    names = ["q", "k", "v", "cu_seqlens", "max_seqlen_carrier"]
    node = onnx.helper.make_node("ViTAttentionPlugin", names, ["out"], domain=domain, num_heads=H, head_size=D,
                                 attention_scale=float(D ** -0.5), qkv_scales=[1.0, 1.0, 1.0])
    f16 = onnx.TensorProto.FLOAT16
    inputs = [onnx.helper.make_tensor_value_info(n, f16, ["T", H, D]) for n in names[:3]] + [
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT32, [None]) for n in names[3:]]
    graph = onnx.helper.make_graph([node], "g", inputs, [onnx.helper.make_tensor_value_info("out", f16, None)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20),
                                                         onnx.helper.make_opsetid(domain, 1)])
    q, k, v = (x.astype(np.float16) for x in _qkv(5))
    feeds = dict(q=q, k=k, v=v, cu_seqlens=np.array([0, 5], np.int32), max_seqlen_carrier=np.zeros(5, np.int32))
    (out,) = reference_evaluator(model).run(None, feeds)
    assert out.dtype == np.float16 and out.shape == (5, H, D)
    np.testing.assert_allclose(out.astype(np.float32), _softmax_attention(*(x.astype(np.float32) for x in (q, k, v)),
                                                                          D ** -0.5), atol=2e-3)
