"""--kv-cache fp8: E4M3 cache I/O and the scales per target (contract part 2 section 8), the CPU reference
storing fp8(x / scale), verify against transformers rounding the same way, and a wrong scale failing."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from safetensors.numpy import save_file

from onnx_rewriter.cli import main
from onnx_rewriter.errors import RewriteError
from onnx_rewriter.pipeline import steps as pipeline
from onnx_rewriter.reference import fp8
from onnx_rewriter.reference.plugin import apply_rope, dense_attention, paged_attention
from onnx_rewriter.verification.llm import verify

E4M3 = onnx.TensorProto.FLOAT8E4M3FN


def _plugins(out):
    model = onnx.load(str(out / "model.onnx"))
    nodes = [n for n in model.graph.node if n.op_type == "AttentionPlugin"]
    return model, nodes, [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]


def _io_types(model):
    return {t.name: t.type.tensor_type.elem_type for t in list(model.graph.input) + list(model.graph.output)
            if "key_values" in t.name}


def test_reference_cache_holds_fp8_of_x_over_scale():
    rng = np.random.default_rng(0)
    hkv, d, s = 2, 8, 5
    k, v = (rng.standard_normal((1, s, hkv * d)).astype(np.float16) for _ in range(2))
    q = rng.standard_normal((1, s, hkv * d)).astype(np.float16)
    table = rng.standard_normal((1, 16, d)).astype(np.float32)
    ks, vs = 0.5, 0.01  # far apart: a K/V or scale mix-up cannot hide
    past = np.zeros((1, 2, hkv, 8, d), fp8.E4M3)
    kw = dict(num_q_heads=hkv, num_kv_heads=hkv, head_size=d, kv_scales=(ks, vs))
    _, present = dense_attention(q, k, v, past, np.array([s]), table, np.zeros(0, np.int32), **kw)
    kr = apply_rope(k.reshape(s, hkv, d), table[0, :s]).transpose(1, 0, 2)
    assert present.dtype == fp8.E4M3
    np.testing.assert_array_equal(present[0, 0, :, :s].view(np.uint8), fp8.encode(kr, ks).view(np.uint8))
    np.testing.assert_array_equal(present[0, 1, :, :s].view(np.uint8),
                                  fp8.encode(v.reshape(s, hkv, d).transpose(1, 0, 2), vs).view(np.uint8))
    # 150 / 0.5 = 300 rounds to 288 (E4M3 steps by 32 above 256); 600 / 0.01 saturates to 448 (the runtime's
    # satfinite), never NaN
    assert fp8.round_trip(np.float32(150.0), ks) == 144.0
    assert fp8.round_trip(np.float32(600.0), vs) == np.float32(448) * np.float32(vs)
    # the paged form writes the same bytes into its pool (K pages, then V pages)
    qkv = np.concatenate([q, k, v], -1)[0]
    pool = np.zeros((2, 2, 128, hkv, d), fp8.E4M3)
    _, pool = paged_attention(qkv, pool, np.array([s]), table[0, :s], np.array([0]), np.array([[[1], [3]]]),
                              np.array([0]), np.array([s]), np.zeros(1), np.zeros(1), **kw)
    np.testing.assert_array_equal(pool.reshape(4, 128, hkv, d)[1, :s].transpose(1, 0, 2).view(np.uint8),
                                  present[0, 0, :, :s].view(np.uint8))
    with pytest.raises(ValueError, match="cache dtype"):
        dense_attention(q, k, v, past.astype(np.float16), np.array([s]), table, np.zeros(0, np.int32), **kw)


@pytest.mark.parametrize("family,target", [("qwen2", "edgellm-0.5"), ("llama", "edgellm-0.11"),
                                           ("qwen2", "edgellm-0.10")])
def test_fp8_kv_verifies(models, tmp_path, family, target):
    out = tmp_path / "out"
    run = pipeline.rewrite(models.baseline(family), out, target=target, kv_cache="fp8")
    model, nodes, attrs = _plugins(out)
    assert set(_io_types(model).values()) == {E4M3} and len(_io_types(model)) == 4
    scales = run.report.features["fp8_kv"]["scales"]
    assert run.report.features["fp8_kv"]["source"] == "calibrated" and len(scales) == 2
    for node, a, (ks, vs) in zip(nodes, attrs, scales):
        assert a["enable_fp8_kv_cache"] == 1
        if target == "edgellm-0.5":  # the scales are one extra last input, fp32 [2]; no qkv_scales attribute
            assert len(node.input) == 6 and "qkv_scales" not in a
            init = next(t for t in model.graph.initializer if t.name == node.input[-1])
            assert init.data_type == onnx.TensorProto.FLOAT
            assert onnx.numpy_helper.to_array(init).tolist() == [np.float32(ks), np.float32(vs)]
        else:
            assert len(node.input) == (6 if target == "edgellm-0.10" else 10)
            np.testing.assert_array_equal(a["qkv_scales"], np.float32([1.0, ks, vs]))
    assert json.loads((out / "config.json").read_text())["kv_cache_dtype"] == "fp8"
    res = verify(out, model=str(models.checkpoint(family)), steps=3, quiet=True)
    assert res.passed, res.table()
    assert res.quantized == "FP8 KV cache" and len(res.quantization) == len(res.steps)
    # the tight comparison is much closer than the FP8 cost it reports apart (measured: 13x, 80x)
    tight, cost = 1 - min(s.cosine for s in res.steps), 1 - min(s.cosine for s in res.quantization)
    assert 5 * tight < cost <= 0.01


def test_wrong_scale_fails_verify(models, tmp_path):
    out = tmp_path / "out"
    pipeline.rewrite(models.baseline("qwen2"), out, target="edgellm-0.9", kv_cache="fp8")
    model = onnx.load(str(out / "model.onnx"))
    for node in (n for n in model.graph.node if n.op_type == "AttentionPlugin"):
        attr = next(a for a in node.attribute if a.name == "qkv_scales")
        attr.floats[1] /= 64  # K saturates at 448 * scale: what a scale computed before RoPE would do
    onnx.save(model, str(out / "model.onnx"))
    res = verify(out, model=str(models.checkpoint("qwen2")), steps=2, quiet=True)
    assert not res.passed
    assert min(s.cosine for s in res.steps) > 0.999  # the oracle rounds with the same (wrong) scales...
    assert min(s.cosine for s in res.quantization) < 0.99  # ...so the FP8 cost bound is what fails


def test_modelopt_scales_taken_as_stored(models, tmp_path):
    ck = tmp_path / "modelopt"
    ck.mkdir()
    stored = {"model.layers.0.self_attn.k_proj.k_scale": 0.03125, "model.layers.0.self_attn.v_proj.v_scale": 0.0075,
              "model.layers.1.self_attn.k_proj.k_scale": 0.021, "model.layers.1.self_attn.v_proj.v_scale": 0.0091}
    save_file({k: np.array(v, np.float32) for k, v in stored.items()}, str(ck / "model.safetensors"))
    run = pipeline.rewrite(models.baseline("qwen2"), tmp_path / "out", target="edgellm-0.9", kv_cache="fp8",
                           kv_scales=str(ck))
    assert run.report.features["fp8_kv"]["source"] == "checkpoint"
    _, _, attrs = _plugins(tmp_path / "out")
    vals = list(stored.values())
    np.testing.assert_array_equal([a["qkv_scales"] for a in attrs],
                                  np.float32([[1.0, vals[0], vals[1]], [1.0, vals[2], vals[3]]]))
    del stored["model.layers.1.self_attn.v_proj.v_scale"]
    save_file({k: np.array(v, np.float32) for k, v in stored.items()}, str(ck / "model.safetensors"))
    with pytest.raises(RewriteError, match="no layer 1 v_scale"):
        pipeline.rewrite(models.baseline("qwen2"), tmp_path / "out2", kv_cache="fp8", kv_scales=str(ck))
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("args,message", [
    (["--kv-cache", "fp8", "--dtype", "float32"], "--kv-cache fp8 needs --dtype float16"),
    (["--kv-scales", "."], "--kv-scales needs --kv-cache fp8"),
    (["--kv-cache", "fp8", "--calibration", "missing.txt"], "--calibration 'missing.txt' is not a file"),
])
def test_cli_refusals(models, tmp_path, capsys, args, message):
    rc = main([str(models.baseline("qwen2")), str(tmp_path / "out")] + args)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("error:") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fp8_kv_with_int4_weights(models, tmp_path):
    dims = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8)
    out = tmp_path / "out"
    pipeline.rewrite(models.baseline("llama", **dims), out, target="edgellm-0.11", quantize="int4", kv_cache="fp8")
    res = verify(out, model=str(models.checkpoint("llama", **dims)), steps=3, quiet=True)
    # the oracle holds the INT4 weights and rounds the cache; the cost line covers both
    assert res.passed and res.quantized == "INT4 + FP8 KV cache", res.table()
