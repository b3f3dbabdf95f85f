"""The W+A checkpoint formats past FP8 / INT8-SQ / NVFP4 on 0.10-0.11 (features/wa_quant.py, contract part 3 16.4-16.7):
NVFP4 on edgellm-0.9 (the graph's opset raised to 23 for FLOAT4E2M1), MIXED_PRECISION (each linear in its own
scheme, `exclude_modules` honoured), W4A16_NVFP4 (FP4 weights dequantized, fp16 activations), and the FP8 KV
cache from the checkpoint's k/v scales. One export (a mixed checkpoint holding every scheme, on 0.9, with the FP8
KV cache) carries the default rows; the other targets and forms are slow."""

from __future__ import annotations

import collections
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_rewriter import cli, export
from onnx_rewriter.features import wa_checkpoint as W
from onnx_rewriter.hf import tiny_quant
from onnx_rewriter.verification.llm import verify

# layer 0: attention FP8, MLP INT8-SQ; layer 1: q/k/v NVFP4, o_proj MXFP8, gate/up W4A16_NVFP4, down_proj excluded
MIX = (("*.layers.0.self_attn.*", "fp8"), ("*.layers.0.mlp.*", "int8_sq"), ("*.layers.1.self_attn.o_proj", "mxfp8"),
       ("*.layers.1.self_attn.*", "nvfp4"), ("*", "w4a16_nvfp4"))
EXCLUDED = "model.layers.1.mlp.down_proj"
ELEM = {"fp8": onnx.TensorProto.FLOAT8E4M3FN, "int8_sq": onnx.TensorProto.INT8, "mxfp8": onnx.TensorProto.FLOAT8E4M3FN,
        "nvfp4": onnx.TensorProto.FLOAT4E2M1, "w4a16_nvfp4": onnx.TensorProto.FLOAT4E2M1}


def _base(module: str) -> str:
    return "/" + module.replace("model.layers.", "model/layers.").replace(".self_attn.", "/self_attn/") \
        .replace(".mlp.", "/mlp/")


@pytest.fixture(scope="module")
def mixed_ckpt(models, tmp_path_factory):
    return tiny_quant.write("mixed", models.checkpoint("llama"), tmp_path_factory.mktemp("mixed") / "ck",
                            signal="hf_quant_config", mixed=MIX, exclude=(EXCLUDED,), kv_scales=(0.05, 0.06))


@pytest.fixture(scope="module")
def mixed_out(mixed_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed_out") / "edgellm-0.9"
    run = export(str(mixed_ckpt), out, target="edgellm-0.9", kv_cache="fp8")
    return out, run


def test_mixed_checkpoint_is_read_per_layer(mixed_ckpt):
    fmt = W.detect(mixed_ckpt)
    assert fmt.scheme == "mixed" and fmt.exclude == ("lm_head", EXCLUDED)
    ck = W.Checkpoint(mixed_ckpt, fmt)
    assert collections.Counter(ck.linears.values()) == {"fp8": 4, "int8_sq": 3, "nvfp4": 3, "mxfp8": 1,
                                                        "w4a16_nvfp4": 2}
    assert EXCLUDED not in ck.linears and fmt.scheme_for(EXCLUDED) is None


def test_mixed_on_09_verifies_each_linear_in_its_scheme(mixed_out, mixed_ckpt):
    out, run = mixed_out
    res = verify(out, model=str(mixed_ckpt), quiet=True)
    assert res.passed, res.table() + "\n" + "\n".join(res.problems)
    assert res.quantized == "FP8 + INT8-SQ + MXFP8 + NVFP4 activation, NVFP4 weight-only + FP8 KV cache"
    assert res.criterion.startswith("mixed W+A") and not res.problems
    entries = {e["node"]: e for e in run.report.features["wa_quant"]["linears"]}
    assert entries[f"{_base(EXCLUDED)}/MatMul"]["reason"] == "not quantized in the checkpoint"
    assert entries["/lm_head/MatMul"]["reason"] == "lm_head stays fp16"
    assert any("opset is raised to 23" in w for w in run.report.warnings)


def test_mixed_graph_holds_each_schemes_bytes_at_opset_23(mixed_out, mixed_ckpt):
    out, _ = mixed_out
    g = onnx.load(str(out / "model.onnx"))
    # 0.9 keeps the export's opset (20) unless FP4 weights need 23 (IR 11); its plugins and the trt:: FP4 ops
    # share the target's `trt` domain
    assert {(o.domain, o.version) for o in g.opset_import} == {("", 23), ("trt", 1)} and g.ir_version == 11
    onnx.checker.check_model(str(out / "model.onnx"))
    ops = collections.Counter((n.domain, n.op_type) for n in g.graph.node)
    # act() chains: FP8 q/k/v + o (2), INT8 gate/up + down (2), NVFP4 q/k/v (1), MXFP8 o (1); weight-only none
    assert ops[("", "QuantizeLinear")] == 4 and ops[("trt", "TRT_FP4DynamicQuantize")] == 1
    assert ops[("trt", "TRT_MXFP8DynamicQuantize")] == 1 and ops[("trt", "TRT_MXFP8DequantizeLinear")] == 2
    assert ops[("", "MatMul")] == 15  # q/k/v stay three MatMuls; the excluded down_proj and lm_head fp16
    inits = {t.name: t for t in g.graph.initializer}
    ck = W.Checkpoint(mixed_ckpt, W.detect(mixed_ckpt))
    for module, scheme in ck.linears.items():
        w = inits[f"{_base(module)}/weight"]
        assert w.data_type == ELEM[scheme], module
        assert w.raw_data == ck.linear(module).tensors["weight"].tobytes(), module  # verbatim
    assert f"{_base(EXCLUDED)}/weight" not in inits
    q = [n for n in g.graph.node if n.op_type == "QuantizeLinear"]
    assert all(len(n.input) == 2 and helper.get_attribute_value(n.attribute[0]) in (17, 3) for n in q)  # opset 23
    plugin = next(n for n in g.graph.node if n.op_type == "AttentionPlugin")
    attrs = {a.name: helper.get_attribute_value(a) for a in plugin.attribute}
    assert attrs["enable_fp8_kv_cache"] == 1 and np.allclose(attrs["qkv_scales"], [1.0, 0.05, 0.06])


def test_swapped_kv_scales_and_a_requantized_weight_only_linear_fail_verify(mixed_out, mixed_ckpt, tmp_path):
    """Two silent traps in one corrupted folder (one verify):
    - k and v scales swapped in layer 1: the twin rounds its cache with the graph's scales, so only the check
      against the checkpoint's own k_scale / v_scale sees it;
    - layer 1's gate_proj (W4A16_NVFP4) reading the NVFP4 activation chain, as NVIDIA maps W4A16_NVFP4 to W4A4
      outside MIXED_PRECISION Nemotron-H (contract 16.7): named, its checkpoint scheme is weight-only."""
    out, _ = mixed_out
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    g = onnx.load(str(bad / "model.onnx"))
    plugin = [n for n in g.graph.node if n.op_type == "AttentionPlugin"][1]
    a = next(a for a in plugin.attribute if a.name == "qkv_scales")
    a.floats[1], a.floats[2] = a.floats[2], a.floats[1]
    nodes = {n.name: n for n in g.graph.node}
    nodes["/model/layers.1/mlp/gate_proj/MatMul"].input[0] = nodes["/model/layers.1/self_attn/q_proj/MatMul"].input[0]
    onnx.save(g, str(bad / "model.onnx"))
    res = verify(bad, model=str(mixed_ckpt), quiet=True)
    assert not res.passed
    assert any("FP8 KV layer 1: the graph's (k, v) scales" in p for p in res.problems), res.problems
    assert any("NVFP4 linear model.layers.1.mlp.gate_proj: the checkpoint's is NVFP4 weight-only" in p
               for p in res.problems), res.problems
    assert not any("layer 0" in p or "layers.0" in p for p in res.problems), res.problems


def test_mixed_with_an_unemitted_layer_is_refused_by_name(models, tmp_path, capsys):
    """A layer listed as W4A16_AWQ (INT4) inside MIXED_PRECISION: named, before the load."""
    ck = tiny_quant.write("mixed", models.checkpoint("llama"), tmp_path / "ck", signal="hf_quant_config",
                          mixed=(("*", "fp8"),))
    cfg = json.loads((ck / "hf_quant_config.json").read_text())
    cfg["quantization"]["quantized_layers"]["model.layers.1.mlp.down_proj"] = {"quant_algo": "W4A16_AWQ"}
    (ck / "hf_quant_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code = cli.main(["export", "--model", str(ck), "--output-dir", str(out), "--target", "edgellm-0.11"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ModelOpt MIXED_PRECISION checkpoint")
    assert "model.layers.1.mlp.down_proj is INT4, which the W+A route does not emit" in last
    assert not out.exists()


@pytest.mark.parametrize("form, words", [
    ("w4a16_nvfp4", "error: NVFP4 weight-only (W4A16_NVFP4) checkpoint: target edgellm-0.5 has no weight+activation"),
    ("mixed", "error: MIXED_PRECISION checkpoint (FP8 W8A8 layers): target edgellm-0.5 has no")])
def test_refused_on_05_before_the_load(models, tmp_path, capsys, form, words):
    ck = tiny_quant.write(form, models.checkpoint("llama"), tmp_path / "ck")
    out = tmp_path / "out"
    code = cli.main(["export", "--model", str(ck), "--output-dir", str(out), "--target", "edgellm-0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "export:" not in err and err.strip().splitlines()[-1].startswith(words)
    assert not out.exists()


def test_mxfp8_codec_and_reference_ops():
    """E8M0 = 127 + ceil(log2(amax / 448)) per 32 values (no value saturates), 0 for an all-zero block; the reference
    ops (trt::TRT_MXFP8DynamicQuantize, TRT_MXFP8DequantizeLinear) round once to fp16."""
    from onnx_rewriter.reference import qdq
    from onnx_rewriter.reference import wa_codecs as C

    x = np.zeros((4, 32), np.float32)
    x[0, 0], x[1, 5], x[2, :] = 448.0, -449.0, np.linspace(-3.0, 3.0, 32)
    codes, scales = C.mxfp8_quantize(x)
    assert scales[:, 0].tolist() == [127, 128, 120, 0]  # 448 -> 2^0; 449 -> 2^1; 3 -> 2^-7 (3 / 448 > 2^-8); zeros
    assert codes[0, 0] == 126 and codes[1, 5] == 0x80 | 0x76  # 448 itself; -449 / 2 = -224.5 -> -224 (1.75 * 2^7)
    y = C.mxfp8_dequantize(codes, scales)
    assert y[0, 0] == 448.0 and y[1, 5] == -448.0 and np.allclose(y[2], x[2], rtol=2 ** -4)
    xq, sx = qdq.mxfp8_dynamic_quantize(x.astype(np.float16))
    out = qdq.mxfp8_dequantize_linear(xq, sx)
    assert out.dtype == np.float16 and np.array_equal(out, y.astype(np.float16))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["edgellm-0.10", "edgellm-0.11"])
def test_mixed_on_010_011(mixed_ckpt, tmp_path, target):
    export(str(mixed_ckpt), tmp_path / "out", target=target, kv_cache="fp8")
    g = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "Nvfp4A16GemmPlugin" for n in g.graph.node) == 2  # layer 1's gate/up (W4A16_NVFP4)
    res = verify(tmp_path / "out", model=str(mixed_ckpt), quiet=True)
    assert res.passed, res.table() + "\n" + "\n".join(res.problems)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["edgellm-0.9", "edgellm-0.10", "edgellm-0.11"])
def test_w4a16_nvfp4(models, tmp_path, target):
    """Weight-only: no activation quantizer; the fp16 rule against the twin, every FP4 weight bit for bit
    (0.10 / 0.11: as Nvfp4A16GemmPlugin, tests/test_nvfp4_a16.py; 0.9: the DequantizeLinear form)."""
    ck = tiny_quant.write("w4a16_nvfp4", models.checkpoint("qwen2"), tmp_path / "ck")
    run = export(str(ck), tmp_path / "out", target=target)
    g = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    assert not any(n.op_type in ("QuantizeLinear", "TRT_FP4DynamicQuantize") for n in g.graph.node)
    assert sum(e["wa"] == "w4a16_nvfp4" for e in run.report.features["wa_quant"]["linears"]) == 14
    assert sum(n.op_type == "Nvfp4A16GemmPlugin" for n in g.graph.node) == (0 if target == "edgellm-0.9" else 14)
    res = verify(tmp_path / "out", model=str(ck), quiet=True)
    assert res.passed and res.quantized == "NVFP4 weight-only", res.table() + "\n" + "\n".join(res.problems)
    assert "weight-only linear's weight equals the model's bit for bit" in res.criterion


@pytest.mark.slow
def test_nvfp4_on_09(models, tmp_path):
    ck = tiny_quant.write("nvfp4", models.checkpoint("qwen2"), tmp_path / "ck", kv_scales=(0.05, 0.06))
    export(str(ck), tmp_path / "out", target="edgellm-0.9", kv_cache="fp8")
    res = verify(tmp_path / "out", model=str(ck), quiet=True)
    assert res.passed and res.quantized == "NVFP4 activation + FP8 KV cache", res.table()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["edgellm-0.9", "edgellm-0.11"])
def test_mxfp8(models, tmp_path, target):
    """MXFP8 (contract 16.5): trt::TRT_MXFP8DynamicQuantize / TRT_MXFP8DequantizeLinear, block 32, E8M0 scales."""
    ck = tiny_quant.write("mxfp8", models.checkpoint("qwen2"), tmp_path / "ck")
    run = export(str(ck), tmp_path / "out", target=target)
    assert any("MXFP8 W8A8" in w for w in run.report.warnings)
    res = verify(tmp_path / "out", model=str(ck), quiet=True)
    assert res.passed and res.quantized == "MXFP8 activation", res.table() + "\n" + "\n".join(res.problems)


@pytest.mark.slow
def test_block_fp8_requantized_to_int4(models, tmp_path):
    """Block-FP8 with --quantize int4: RTN INT4 of the exactly dequantized fp16 weights (the linears whose K is a
    multiple of 128: down_proj here), said in the report; verify's INT4 oracle re-quantizes the same weights."""
    ck = tiny_quant.write("block_fp8", models.checkpoint("llama"), tmp_path / "ck")
    run = export(str(ck), tmp_path / "out", target="edgellm-0.11", quantize="int4")
    assert any("block-FP8" in w and "re-quantized" in w for w in run.report.warnings)
    assert sum(1 for e in run.report.features["int4"]["linears"] if e.get("int4")) == 2
    res = verify(tmp_path / "out", model=str(ck), quiet=True)
    assert res.passed and res.quantization, res.table()


def test_fp4_opset_raise_on_09_refuses_an_op_whose_meaning_changed(mixed_ckpt):
    """0.9 graphs are relabelled to opset 23, not converted: an input holding GroupNormalization (changed at 21) is
    refused by name; without it the feature asks for opset 23 (run.min_opset)."""
    from types import SimpleNamespace

    import onnx_graphsurgeon as gs

    from onnx_rewriter.errors import UnsupportedModel
    from onnx_rewriter.features.wa_quant import WaQuant
    from onnx_rewriter.targets import TARGETS

    def run_with(*ops):
        graph = gs.Graph(nodes=[gs.Node(op, name=op) for op in ops])
        return SimpleNamespace(options=SimpleNamespace(dtype="float16"), warn=lambda msg: None, min_opset=0,
                               source=SimpleNamespace(graph=graph, opset=20))

    target = TARGETS["edgellm-0.9"]
    with pytest.raises(UnsupportedModel, match="keeps the input's \\(20\\), where GroupNormalization means"):
        WaQuant(str(mixed_ckpt)).check(run_with("MatMul", "GroupNormalization"), target)
    run = run_with("MatMul")
    WaQuant(str(mixed_ckpt)).check(run, target)
    assert run.min_opset == 23
