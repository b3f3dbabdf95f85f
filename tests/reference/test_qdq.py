"""The Q/DQ reference ops (reference/qdq.py, registered in reference/ops.py) in ONNX graphs of the forms contract
part 3 puts around a quantized linear (16.3 FP8, 16.4 NVFP4, 16.5 INT8-SQ), against the codecs; onnx's own
evaluator as a cross-check where the two must agree."""

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from onnx.reference import ReferenceEvaluator

from onnx_rewriter.reference import qdq
from onnx_rewriter.reference import wa_codecs as C
from onnx_rewriter.reference.ops import reference_evaluator

RNG = np.random.default_rng(7)


def _model(nodes, inputs, outputs, inits, opset=23):
    g = h.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset), h.make_opsetid("trt", 1)], ir_version=11)


def _vi(name, elem, shape):
    return h.make_tensor_value_info(name, elem, shape)


def test_fp8_activation_chain_divides_in_fp32_and_saturates():
    x = (RNG.standard_normal((2, 3, 32)) * 4).astype(np.float16)
    x[0, 0, :4] = [1000, -1000, 0, np.float16(-0.0)]  # saturate to +-448 * s
    s = np.array(0.0123, np.float16)
    m = _model([h.make_node("QuantizeLinear", ["x", "s"], ["q"], output_dtype=17),
                h.make_node("DequantizeLinear", ["q", "s"], ["y"])],
               [_vi("x", T.FLOAT16, x.shape)], [_vi("q", T.FLOAT8E4M3FN, x.shape), _vi("y", T.FLOAT16, x.shape)],
               [nh.from_array(s, "s")])
    q, y = reference_evaluator(m).run(None, {"x": x})
    codes = C.e4m3_encode(x.astype(np.float32) / np.float32(s))
    assert q.dtype == qdq.E4M3 and np.array_equal(q.view(np.uint8), codes)
    assert codes[0, 0, :2].tolist() == [126, 254]
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, (C.e4m3_decode(codes).astype(np.float64) * float(s)).astype(np.float16))
    # onnx's evaluator agrees where the quotient is the same (fp32 input: it divides in x's dtype)
    m32 = _model(m.graph.node, [_vi("x", T.FLOAT, x.shape)], [_vi("q", T.FLOAT8E4M3FN, x.shape),
                 _vi("y", T.FLOAT, x.shape)], [nh.from_array(s.astype(np.float32), "s")])
    ours, theirs = reference_evaluator(m32).run(None, {"x": x.astype(np.float32)}), \
        ReferenceEvaluator(m32).run(None, {"x": x.astype(np.float32)})
    assert np.array_equal(ours[0].view(np.uint8), theirs[0].view(np.uint8))
    np.testing.assert_array_equal(ours[1], theirs[1])


def test_fp8_linear_matches_numpy():
    """act(x) @ Transpose(DequantizeLinear(W fp8, s_w)): contract 16.3 end to end at one linear."""
    n, k = 24, 32
    w = RNG.standard_normal((n, k)).astype(np.float32) * 0.1
    s_w = np.float16(np.abs(w).max() / 448)
    s_in = np.array(np.float16(3.0 / 448))
    codes = C.e4m3_encode(w / np.float32(s_w))
    wt = onnx.TensorProto()
    wt.CopyFrom(h.make_tensor("w", T.FLOAT8E4M3FN, [n, k], codes.tobytes(), raw=True))  # bytes verbatim
    nodes = [h.make_node("QuantizeLinear", ["x", "s_in"], ["xq"], output_dtype=17),
             h.make_node("DequantizeLinear", ["xq", "s_in"], ["xd"]),
             h.make_node("DequantizeLinear", ["w", "s_w"], ["wd"]),
             h.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
             h.make_node("MatMul", ["xd", "wt"], ["y"])]
    x = (RNG.standard_normal((1, 5, k)) * 1.5).astype(np.float16)
    m = _model(nodes, [_vi("x", T.FLOAT16, [1, 5, k])], [_vi("y", T.FLOAT16, [1, 5, n])],
               [wt, nh.from_array(np.array(s_w), "s_w"), nh.from_array(s_in, "s_in")])
    (y,) = reference_evaluator(m).run(None, {"x": x})
    xd = (C.e4m3_decode(C.e4m3_encode(x.astype(np.float32) / np.float32(s_in))).astype(np.float64)
          * float(s_in)).astype(np.float16)
    wd = (C.e4m3_decode(codes).astype(np.float64) * float(s_w)).astype(np.float16)
    np.testing.assert_allclose(y.astype(np.float32), xd.astype(np.float32) @ wd.T.astype(np.float32),
                               rtol=2e-3, atol=2e-3)


def test_int8_smoothquant_chain():
    """Mul(x, pqs) -> Q int8 (fp32 scale) -> DQ -> Cast fp16; W int8 [N, K] with s_w fp32 [N] on axis 0."""
    n, k = 16, 32
    x = (RNG.standard_normal((1, 4, k)) * 2).astype(np.float16)
    pqs = np.exp2(RNG.integers(-2, 3, k)).astype(np.float16)
    s_in = np.array(8.0 / 127, np.float32)
    wq = RNG.integers(-127, 128, (n, k)).astype(np.int8)
    s_w = (RNG.uniform(0.5, 2, n) / 127).astype(np.float32)
    nodes = [h.make_node("Mul", ["x", "pqs"], ["xs"]),
             h.make_node("QuantizeLinear", ["xs", "s_in"], ["xq"], output_dtype=3),
             h.make_node("DequantizeLinear", ["xq", "s_in"], ["xd32"]),
             h.make_node("Cast", ["xd32"], ["xd"], to=T.FLOAT16),
             h.make_node("DequantizeLinear", ["w", "s_w"], ["wd32"], axis=0),
             h.make_node("Cast", ["wd32"], ["wd"], to=T.FLOAT16)]
    m = _model(nodes, [_vi("x", T.FLOAT16, x.shape)], [_vi("xq", T.INT8, x.shape), _vi("xd", T.FLOAT16, x.shape),
               _vi("wd", T.FLOAT16, [n, k])],
               [nh.from_array(pqs, "pqs"), nh.from_array(s_in, "s_in"), nh.from_array(wq, "w"),
                nh.from_array(s_w, "s_w")])
    xq, xd, wd = reference_evaluator(m).run(None, {"x": x})
    xs = x * pqs  # fp16 Mul
    np.testing.assert_array_equal(xq, C.int8_quantize(xs.astype(np.float32), s_in))
    np.testing.assert_array_equal(xd, (xq.astype(np.float32) * s_in).astype(np.float16))
    np.testing.assert_array_equal(wd, (wq.astype(np.float32) * s_w[:, None]).astype(np.float16))
    theirs = ReferenceEvaluator(m).run(None, {"x": x})  # onnx's evaluator agrees on every output
    for a, b in zip((xq, xd, wd), theirs):
        np.testing.assert_array_equal(a, b)


def _nvfp4_weight_graph(packed, sblk, s_g, n, k):
    """Contract 16.4's wdq: Cast(DequantizeLinear(W FLOAT4E2M1, DequantizeLinear(s_blk, s_g); -1, 16), fp16),
    W's raw bytes the checkpoint's [N, K/2] uint8 verbatim, s_blk's the E4M3 bytes."""
    w = h.make_tensor("w", T.FLOAT4E2M1, [n, k], packed.tobytes(), raw=True)
    sb = h.make_tensor("s_blk", T.FLOAT8E4M3FN, [n, k // 16], sblk.tobytes(), raw=True)
    nodes = [h.make_node("DequantizeLinear", ["s_blk", "s_g"], ["d"]),
             h.make_node("DequantizeLinear", ["w", "d"], ["wd"], axis=-1, block_size=16),
             h.make_node("Cast", ["wd"], ["y"], to=T.FLOAT16)]
    return _model(nodes, [], [_vi("y", T.FLOAT16, [n, k])], [w, sb, nh.from_array(np.array(s_g, np.float32), "s_g")])


def test_nvfp4_weight_bytes_verbatim_dequantize_per_block():
    """The seeded matrix of contract 16.6 (bytes pinned by SHA-256 in test_wa_codecs): onnx reads a FLOAT4E2M1
    tensor's bytes low nibble first, as the checkpoint packs them, and each 16-block gets its own scale."""
    w = (np.random.default_rng(20240607).standard_normal((32, 64)) * 0.02).astype(np.float32)
    w *= np.repeat(np.exp2(np.arange(4) * 3.0), 16)[None, :]  # the 4 blocks of a row differ 8x each
    packed, sblk, s_g = C.nvfp4_quantize_weight(w)
    (y,) = reference_evaluator(_nvfp4_weight_graph(packed, sblk, s_g, 32, 64)).run(None, {})
    want = C.nvfp4_dequantize(packed, sblk, s_g)
    np.testing.assert_array_equal(y, want.astype(np.float16))
    step = np.repeat(C.e4m3_decode(sblk) * s_g, 16, axis=-1)
    assert np.all(np.abs(y.astype(np.float32) - w) <= step * 1.001 + 1e-6)
    (theirs,) = ReferenceEvaluator(_nvfp4_weight_graph(packed, sblk, s_g, 32, 64)).run(None, {})
    np.testing.assert_array_equal(y, theirs)


def test_nvfp4_activation_chain():
    """trt::TRT_FP4DynamicQuantize -> trt::DequantizeLinear(sx, Cast(s_in)) -> trt::DequantizeLinear(x_f4, d)."""
    k = 64
    x = (RNG.standard_normal((2, 3, k)) * np.repeat([0.1, 1, 10, 100], 16)).astype(np.float16)
    s_in = np.array(np.abs(x.astype(np.float32)).max() / (6 * 448), np.float32)
    nodes = [h.make_node("TRT_FP4DynamicQuantize", ["x", "s_in"], ["xf4", "sx"], domain="trt", axis=-1,
                         block_size=16, scale_type=17),
             h.make_node("Cast", ["s_in"], ["s16"], to=T.FLOAT16),
             h.make_node("DequantizeLinear", ["sx", "s16"], ["d"], domain="trt"),
             h.make_node("DequantizeLinear", ["xf4", "d"], ["y"], domain="trt", axis=-1, block_size=16)]
    m = _model(nodes, [_vi("x", T.FLOAT16, x.shape)], [_vi("y", T.FLOAT16, x.shape), _vi("sx", T.FLOAT8E4M3FN,
               [2, 3, k // 16])], [nh.from_array(s_in, "s_in")])
    y, sx = reference_evaluator(m).run(None, {"x": x})
    codes, sx_want = C.fp4_dynamic_quantize(x, s_in, ties="even")
    assert np.array_equal(sx.view(np.uint8), sx_want)
    d = (C.e4m3_decode(sx_want).astype(np.float64) * float(np.float16(s_in))).astype(np.float16)
    want = (C.e2m1_decode(codes).astype(np.float64) * np.repeat(d.astype(np.float64), 16, axis=-1)).astype(np.float16)
    np.testing.assert_array_equal(y, want)
    rel = np.abs(y.astype(np.float32) - x) / np.repeat(np.abs(x).reshape(2, 3, 4, 16).max(-1), 16, axis=-1)
    # Half an E2M1 step (1 at the top of [0, 6]) of the block scale d, which E4M3 rounds to within 2^-4 of
    # amax / 6: at most (1 + 2^-4) / 6 of the block's amax (plus fp16 rounding).
    assert rel.max() <= (1 + 2 ** -4) / 6 + 1e-3


def test_fp4_dynamic_quantize_refuses_other_forms():
    with pytest.raises(ValueError, match="2-D or 3-D"):
        qdq.fp4_dynamic_quantize(np.zeros((1, 1, 1, 16), np.float16), 1.0)
    with pytest.raises(NotImplementedError, match="block_size=32"):
        qdq.fp4_dynamic_quantize(np.zeros((1, 32), np.float16), 1.0, block_size=32)


def test_blocked_scale_must_fit():
    x = np.zeros((4, 64), np.uint8).view(ml_dtypes.float4_e2m1fn)
    with pytest.raises(ValueError, match="does not fit"):
        qdq.dequantize_linear(x, np.ones((4, 3), np.float32), axis=-1, block_size=16)
    with pytest.raises(ValueError, match="zero point"):
        qdq.dequantize_linear(np.ones(4, np.uint8).view(ml_dtypes.float8_e4m3fn), np.float32(1),
                              np.ones(4, np.uint8).view(ml_dtypes.float8_e4m3fn))


def test_fp8_quantize_rounds_once_from_the_fp32_quotient():
    """Every fp16 value in [-8, 8]: our codes are e4m3(fp32 x / s); onnx's evaluator divides in fp16 and rounds
    twice, which differs somewhere (the reason the op is ours)."""
    x = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16)
    x = np.concatenate([x, -x])
    x = x[np.abs(x) <= 8].reshape(1, -1)
    s = np.array(0.0123, np.float16)
    m = _model([h.make_node("QuantizeLinear", ["x", "s"], ["q"], output_dtype=17)],
               [_vi("x", T.FLOAT16, x.shape)], [_vi("q", T.FLOAT8E4M3FN, x.shape)], [nh.from_array(s, "s")])
    (q,) = reference_evaluator(m).run(None, {"x": x})
    assert np.array_equal(q.view(np.uint8), C.e4m3_encode(x.astype(np.float32) / np.float32(s)))
    (theirs,) = ReferenceEvaluator(m).run(None, {"x": x})
    assert not np.array_equal(q.view(np.uint8), theirs.view(np.uint8))
