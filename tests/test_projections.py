"""q/k/v as one MatMul and no plumbing around the plugin (onnx_rewriter/projections.py), on every target."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from onnx_rewriter.modelio import stream
from onnx_rewriter.pipeline import steps as pipeline
from onnx_rewriter.verification.llm import verify

TARGETS = ["edgellm-0.5", "edgellm-0.9", "edgellm-0.11"]
# Tiny qwen2 (q/k/v biases): hidden 64, 4 q heads, 2 kv heads, head size 16, 2 layers.
WIDTHS = [64, 32, 32]


def _graph(out):
    model = onnx.load(str(out / "model.onnx"))
    made_by = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    return model, made_by, inits


@pytest.mark.parametrize("target", TARGETS)
def test_one_matmul_for_qkv_feeds_the_plugin(models, tmp_path, target):
    pipeline.rewrite(models.baseline("qwen2"), tmp_path / "out", target=target)
    model, made_by, inits = _graph(tmp_path / "out")
    ops = collections.Counter(n.op_type for n in model.graph.node)
    # per layer q/k/v (one), o, gate, up, down; plus lm_head. Nothing left to pack or reshape q/k/v.
    assert ops["MatMul"] == 2 * 5 + 1
    assert ops["Concat"] == 0 and ops["Transpose"] == 0
    assert ops["Split"] == (2 if target == "edgellm-0.9" else 0)
    for i, plugin in enumerate(n for n in model.graph.node if n.op_type == "AttentionPlugin"):
        mm = made_by[f"/model/layers.{i}/self_attn/qkv_proj/MatMul_out"]
        assert mm.name == f"/model/layers.{i}/self_attn/qkv_proj/MatMul"
        w = inits[mm.input[1]]
        assert list(w.dims) == [64, sum(WIDTHS)] and w.data_type == TensorProto.FLOAT16
        bias_add = made_by[f"/model/layers.{i}/self_attn/qkv_proj/Add_out"]
        assert list(inits[bias_add.input[1]].dims) == [sum(WIDTHS)]
        src = made_by[plugin.input[0]]
        if target == "edgellm-0.5":
            assert src is bias_add
        elif target == "edgellm-0.11":
            assert src.op_type == "Squeeze" and made_by[src.input[0]] is bias_add
        else:
            assert src.op_type == "Split" and list(plugin.input[:3]) == list(src.output)
            assert made_by[src.input[0]] is bias_add
            assert numpy_helper.to_array(inits[src.input[1]]).tolist() == WIDTHS
        # o_proj reads one Reshape of the plugin's output
        reshape = next(n for n in model.graph.node if plugin.output[0] in n.input)
        assert reshape.op_type == "Reshape"
        assert next(n for n in model.graph.node if reshape.output[0] in n.input).op_type == "MatMul"


@pytest.mark.parametrize("target", TARGETS)
def test_fuse_qkv_off_keeps_the_three_projections(models, tmp_path, target):
    run = pipeline.rewrite(models.baseline("qwen2"), tmp_path / "out", target=target, fuse_qkv=False)
    model, made_by, _ = _graph(tmp_path / "out")
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["MatMul"] == 2 * 7 + 1 and ops["Split"] == 0
    assert not any("qkv_proj" in n.name for n in model.graph.node)
    assert ops["Concat"] == (0 if target == "edgellm-0.9" else 2)
    plugin = next(n for n in model.graph.node if n.op_type == "AttentionPlugin")
    if target == "edgellm-0.9":  # q, k, v straight from their bias Adds: no Reshape in between
        assert [made_by[t].op_type for t in plugin.input[:3]] == ["Add"] * 3
    assert run.report.error is None


def test_fused_weights_streamed_from_the_checkpoint_verify(models, tmp_path):
    """`make export`'s baseline (weights referenced in the checkpoint, read transposed; q large enough to stay on
    disk, k and v small enough to be loaded): the fused weight is written from both kinds and verifies."""
    dims = dict(hidden_size=384, num_attention_heads=6, num_key_value_heads=2, head_dim=64, intermediate_size=256)
    base = models.baseline("llama", refs=True, **dims)
    fused = []
    for external in (False, True):
        out = tmp_path / f"out-{external}"
        pipeline.rewrite(base, out, target="edgellm-0.11", external_data=external)
        model, made_by, inits = _graph(out)
        w = inits[made_by["/model/layers.0/self_attn/qkv_proj/MatMul_out"].input[1]]
        assert list(w.dims) == [384, 384 + 128 + 128]
        fused.append(numpy_helper.to_array(w, base_dir=str(out)))
    np.testing.assert_array_equal(fused[0], fused[1])  # the inline and the external-data writer agree
    res = verify(tmp_path / "out-False", model=str(models.checkpoint("llama", **dims)), quiet=True)
    assert res.passed, res.table()


def _external(tmp_path, name, arr, perm=None):
    """An fp32 tensor stored in `name`.bin, optionally stored as its transpose and read back through `perm`."""
    stored = arr if perm is None else np.ascontiguousarray(arr.transpose(np.argsort(perm)))
    (tmp_path / f"{name}.bin").write_bytes(stored.tobytes())
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=arr.shape, data_location=TensorProto.EXTERNAL)
    for k, v in (("location", f"{name}.bin"), ("offset", "0"), ("length", str(stored.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    if perm is not None:
        t.doc_string = stream.TRANSPOSED + ",".join(map(str, perm))
    return t


def test_concatenated_streams_row_blocks_from_every_kind_of_source(tmp_path):
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal((37, n)).astype(np.float32) for n in (16, 8, 8))
    sources = [_external(tmp_path, "a", a, perm=(1, 0)), numpy_helper.from_array(b, "b"), _external(tmp_path, "c", c)]
    t = stream.concatenated("abc", sources)
    want = np.concatenate([a, b, c], axis=-1)
    assert list(t.dims) == [37, 32]
    # chunks of 3 rows (and a short last one): the blocks join to the concatenation, row-major
    got = np.concatenate([ch.copy() for ch in stream.chunks(t, tmp_path, chunk_bytes=3 * 32 * 4)])
    np.testing.assert_array_equal(got.reshape(37, 32), want)
    half = np.concatenate([ch.copy() for ch in stream.converted(t, tmp_path, TensorProto.FLOAT16)])
    np.testing.assert_array_equal(half.reshape(37, 32), want.astype(np.float16))
    np.testing.assert_array_equal(stream.array(t, tmp_path), want)


def test_loaded_fp32_weight_joins_bf16_siblings_only_when_exact():
    """A bf16 checkpoint's small weights are widened on load; they rejoin their bf16 siblings as bf16 bits."""
    import onnx_graphsurgeon as gs

    from onnx_rewriter.projections import _proto

    a = np.arange(12, dtype=np.float32).reshape(3, 4) * 0.5
    p = _proto(gs.Constant("a", a), TensorProto.BFLOAT16)
    assert p.data_type == TensorProto.BFLOAT16
    np.testing.assert_array_equal(stream.bf16_bits_to_fp32(stream.array(p, ".")), a)
    assert _proto(gs.Constant("b", a + np.float32(1e-3)), TensorProto.BFLOAT16) is None


def test_every_unfused_layer_says_why(models, tmp_path):
    """Like a pattern's miss, a q/k/v fusion not done is recorded with its reason (report.layers[i].qkv_unfused):
    Phi-3 exports one qkv_proj already, sliced three ways; qwen2's three projections fuse (no reason)."""
    run = pipeline.rewrite(models.baseline("phi3"), tmp_path / "phi3", target="edgellm-0.9")
    for layer in run.report.layers:
        assert layer.rewritten and "not MatMul(x, W)" in layer.qkv_unfused, layer
        assert "q (from " in layer.qkv_unfused
    run = pipeline.rewrite(models.baseline("qwen2"), tmp_path / "qwen2", target="edgellm-0.9")
    assert [l.qkv_unfused for l in run.report.layers] == [None, None]
    run = pipeline.rewrite(models.baseline("qwen2"), tmp_path / "off", target="edgellm-0.9", fuse_qkv=False)
    assert [l.qkv_unfused for l in run.report.layers] == [None, None]  # not tried
