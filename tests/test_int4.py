"""--quantize int4 (RTN): the rewritten graph verifies against transformers holding the same dequantized
weights, on every target; constraints leave linears FP16 with the reason; a packing bug fails verify."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest

from onnx_rewriter.cli import main
from onnx_rewriter.errors import UnsupportedModel
from onnx_rewriter.features.int4 import layout as int4_layout
from onnx_rewriter.pipeline import steps as pipeline
from onnx_rewriter.verification.llm import verify

# K and N of every decoder linear a multiple of 128: hidden 128 (8 heads of 16), MLP 256.
DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8)
# Same with 2 kv heads: k/v projections are N = 32, which no target's INT4 GEMM takes.
GQA = dict(DIMS, num_key_value_heads=2)
OPS = {"edgellm-0.5": ("trt", "Int4GroupwiseGemmPlugin"), "edgellm-0.9": ("trt", "Int4GroupwiseGemmPlugin"),
       "edgellm-0.10": ("trt_edgellm", "Int4GroupwiseGemmPluginV2"),
       "edgellm-0.11": ("trt_edgellm", "Int4GroupwiseGemmPluginV2")}


def _ops(out):
    model = onnx.load(str(out / "model.onnx"))
    return collections.Counter((n.domain, n.op_type) for n in model.graph.node if n.domain), model


def _check(models, family, target, tmp_path, dims=DIMS, **opts):
    base = models.baseline(family, **dims)
    run = pipeline.rewrite(base, tmp_path / "out", target=target, quantize="int4", **opts)
    res = verify(tmp_path / "out", model=str(models.checkpoint(family, **dims)), quiet=True)
    assert res.passed, res.table()
    # the oracle held the INT4 weights: the tight comparison says nothing about INT4's cost, this does
    assert len(res.quantization) == len(res.steps) and min(s.cosine for s in res.quantization) < 0.9999
    return run


@pytest.mark.parametrize("target", ["edgellm-0.5", "edgellm-0.9", "edgellm-0.10", "edgellm-0.11"])
def test_rtn_verifies_on_every_target(models, tmp_path, target):
    run = _check(models, "qwen2", target, tmp_path)
    ops, model = _ops(tmp_path / "out")
    # 2 layers x (q, k, v, o, gate, up, down); lm_head stays FP16
    assert ops[OPS[target]] == 14
    linears = run.report.features["int4"]["linears"]
    assert [e["reason"] for e in linears if not e["int4"]] == ["lm_head stays FP16"]
    assert ops[("trt_edgellm", "QkvConcatPlugin")] == (2 if target == "edgellm-0.11" else 0)
    node = next(n for n in model.graph.node if n.op_type == OPS[target][1])
    assert {a.name: a.i for a in node.attribute} == {"gemm_n": 128, "gemm_k": 128, "group_size": 128}
    inits = {t.name: t for t in model.graph.initializer}
    qw, sc = inits[node.input[1]], inits[node.input[2]]
    assert qw.data_type == onnx.TensorProto.INT8 and sc.data_type == onnx.TensorProto.FLOAT16
    v2 = OPS[target][1].endswith("V2")
    assert list(qw.dims) == ([16, 512] if v2 else [64, 128]) and list(sc.dims) == [1, 128]
    if target == "edgellm-0.10":  # INT4 q/k/v: three plugins -> a plain Concat -> plugin input 0 (contract 3 §17.5)
        attn = next(n for n in model.graph.node if n.op_type == "AttentionPlugin")
        concat = next(n for n in model.graph.node if attn.input[0] in n.output)
        assert concat.op_type == "Concat" and len(concat.input) == 3


@pytest.mark.slow
@pytest.mark.parametrize("target", ["edgellm-0.5", "edgellm-0.11"])
def test_rtn_llama_slow(models, tmp_path, target):
    _check(models, "llama", target, tmp_path)


def test_v1_on_010(models, tmp_path):
    """0.10 has both layouts (V2 by default); V1 keeps 0.9's N % 128, so GQA's N = 32 k/v would stay FP16."""
    _check(models, "qwen2", "edgellm-0.10", tmp_path, int4_plugin_version=1)
    ops, _ = _ops(tmp_path / "out")
    assert ops[("trt_edgellm", "Int4GroupwiseGemmPlugin")] == 14 and not ops[OPS["edgellm-0.10"]]


def test_v1_on_011_takes_small_n(models, tmp_path):
    _check(models, "llama", "edgellm-0.11", tmp_path, dims=GQA, int4_plugin_version=1)
    ops, _ = _ops(tmp_path / "out")
    # V1 on 0.11 runs N % 128 != 0 through its GEMV (N % 8): the N = 32 k/v projections are INT4 too
    assert ops[("trt_edgellm", "Int4GroupwiseGemmPlugin")] == 14


def test_gqa_kv_projections_stay_fp16_with_reason(models, tmp_path):
    run = _check(models, "llama", "edgellm-0.9", tmp_path, dims=GQA)
    kept = [e for e in run.report.features["int4"]["linears"] if not e["int4"]]
    assert [e["reason"] for e in kept] == ["N=32 is not a multiple of 128 (Int4GroupwiseGemmPlugin)"] * 4 + [
        "lm_head stays FP16"]
    assert any("4 of 14 linears stay FP16" in w for w in run.report.warnings)
    ops, _ = _ops(tmp_path / "out")
    assert ops[("trt", "Int4GroupwiseGemmPlugin")] == 10


def test_packing_bug_fails_verify(models, tmp_path, monkeypatch):
    base = models.baseline("qwen2", **DIMS)
    good = int4_layout.pack_v1

    def swapped(u):  # the two nibbles of every byte exchanged
        b = good(u).view(np.uint8)
        return ((b >> 4) | (b << 4)).astype(np.uint8).view(np.int8)

    monkeypatch.setitem(int4_layout.PACKERS, 1, (swapped, int4_layout.unpack_v1))
    pipeline.rewrite(base, tmp_path / "out", target="edgellm-0.9", quantize="int4")
    res = verify(tmp_path / "out", model=str(models.checkpoint("qwen2", **DIMS)), quiet=True)
    assert not res.passed and min(s.cosine for s in res.steps) < 0.99


@pytest.mark.parametrize("opts,message", [
    (dict(dtype="float32"), "--quantize int4 needs --dtype float16"),
    (dict(int4_plugin_version=2), "--int4-plugin-version 2: edgellm-0.9 has only Int4GroupwiseGemmPlugin"),
    (dict(quantize="int8"), "unknown --quantize 'int8'; choose int4"),
])
def test_refusals(models, tmp_path, opts, message):
    opts = {"quantize": "int4", **opts}
    with pytest.raises(UnsupportedModel, match=message):
        pipeline.rewrite(models.baseline("qwen2", **DIMS), tmp_path / "out", target="edgellm-0.9", **opts)
    assert not (tmp_path / "out").exists()


def test_cli_quantize_and_report(models, tmp_path, capsys):
    rc = main([str(models.baseline("qwen2", **DIMS)), str(tmp_path / "out"), "--quantize", "int4",
               "--target", "edgellm-0.11", "--int4-plugin-version", "2", "--report", str(tmp_path / "r.json"), "-q"])
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())["features"]["int4"]
    assert rep["plugin"] == "Int4GroupwiseGemmPluginV2" and rep["group_size"] == 128
    assert sum(e["int4"] for e in rep["linears"]) == 14


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_export_quantize_streams_checkpoint_weights(models, tmp_path, caplog, dtype):
    """`make export` route: the model is traced with the checkpoint's weights mapped, never loaded (fp32, bf16
    and fp16 checkpoints are exported in their own dtype), and the baseline references them (read transposed
    while writing)."""
    import logging

    from onnx_rewriter import export

    ckpt = models.checkpoint("llama", dtype=dtype, **DIMS)
    with caplog.at_level(logging.INFO, logger="onnx_rewriter"):
        run = export(str(ckpt), tmp_path / "out", target="edgellm-0.11", quantize="int4")
    assert "weights mapped from the checkpoint" in caplog.text and "is loaded to trace it" not in caplog.text
    assert sum(e["int4"] for e in run.report.features["int4"]["linears"]) == 14
    if dtype != "bfloat16":  # fp16: a half-precision trace; bf16 differs from it only in the weights' type
        res = verify(tmp_path / "out", model=str(ckpt), quiet=True)
        assert res.passed, res.table()
