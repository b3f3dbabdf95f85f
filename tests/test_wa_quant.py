"""FP8 W8A8 from a ModelOpt FP8 checkpoint through `export` (features/wa_quant.py, contract part 3 16.2/16.3):
the graph's Q/DQ pairs hold the checkpoint's bytes and scales, verify passes against the fake-quantized twin
and fails on a corrupted folder, and the targets without W+A quantization are refused by name, before the load."""

from __future__ import annotations

import collections
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_rewriter import cli, export
from onnx_rewriter.errors import RewriteError
from onnx_rewriter.features import wa_checkpoint as W
from onnx_rewriter.hf import tiny_quant
from onnx_rewriter.verification.llm import verify

TARGETS = ["edgellm-0.11", "edgellm-0.9"]


def _modelopt_ckpt(models, tmp_path_factory, form: str, **kw):
    """The tiny Llama written as a ModelOpt `form` checkpoint (hf/tiny_quant.py), for a module's fixtures."""
    return tiny_quant.write(form, models.checkpoint("llama"), tmp_path_factory.mktemp(form) / "ck", **kw)


@pytest.fixture(scope="module")
def fp8_ckpt(models, tmp_path_factory):
    return _modelopt_ckpt(models, tmp_path_factory, "fp8", signal="hf_quant_config")


@pytest.fixture(scope="module")
def exported(fp8_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_out")
    out = {}
    for target in TARGETS:
        keep = root / "baseline" if target == TARGETS[0] else None
        run = export(str(fp8_ckpt), root / target, target=target, keep_baseline=keep)
        out[target] = (root / target, run)
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_fp8_export_verifies(exported, fp8_ckpt, target):
    out, _ = exported[target]
    res = verify(out, model=str(fp8_ckpt), quiet=True)
    assert res.passed, res.table() + "\n" + "\n".join(res.problems)
    assert res.criterion.startswith("W8A8") and not res.problems
    assert res.quantized == "FP8 activation" and res.quantization  # the activation cost is reported
    ours = np.mean([1 - s.cosine for s in res.ours_vs_original])
    twin = np.mean([1 - s.cosine for s in res.quantization])
    assert ours <= 2 * twin + 0.002 and twin > 0  # measured: 0.0044 vs 0.0047


def test_miswired_linear_fails_verify_on_its_cost(exported, fp8_ckpt, tmp_path):
    """o_proj of layer 0 reading the q/k/v chain (same shape, same scale): every per-linear check passes, the
    end-to-end cost rule fails it (measured 0.87 vs the twin's 0.0047)."""
    out, _ = exported["edgellm-0.11"]
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    g = onnx.load(str(bad / "model.onnx"))
    nodes = {n.name: n for n in g.graph.node}
    layer0 = "/model/layers.0/self_attn"
    nodes[f"{layer0}/o_proj/MatMul"].input[0] = nodes[f"{layer0}/q_proj/MatMul"].input[0]
    onnx.save(g, str(bad / "model.onnx"))
    res = verify(bad, model=str(fp8_ckpt), quiet=True)
    assert not res.passed and not res.problems
    assert np.mean([1 - s.cosine for s in res.ours_vs_original]) > 0.1


@pytest.mark.parametrize("target", TARGETS)
def test_fp8_graph_holds_the_checkpoints_bytes_and_scales(exported, fp8_ckpt, target):
    out, run = exported[target]
    g = onnx.load(str(out / "model.onnx"))
    ops = collections.Counter(n.op_type for n in g.graph.node)
    # 2 layers x (q/k/v, o, gate/up, down) act() chains; 14 weight DQs; q/k/v stay three MatMuls (+ lm_head)
    assert ops["QuantizeLinear"] == 8 and ops["DequantizeLinear"] == 8 + 14 and ops["MatMul"] == 15
    inits = {t.name: t for t in g.graph.initializer}
    ck = W.Checkpoint(fp8_ckpt, W.detect(fp8_ckpt))
    for module in ck.linears:
        lin = ck.linear(module)
        base = "/" + module.replace("model.layers.", "model/layers.").replace(".self_attn.", "/self_attn/") \
            .replace(".mlp.", "/mlp/")
        w = inits[f"{base}/weight"]
        assert w.data_type == onnx.TensorProto.FLOAT8E4M3FN and list(w.dims) == list(lin.tensors["weight"].shape)
        assert w.raw_data == lin.tensors["weight"].tobytes()  # the checkpoint's bytes, verbatim
        s_w = numpy_helper.to_array(inits[f"{base}/weight_scale"])
        assert s_w.dtype == np.float16 and s_w.shape == () and s_w == np.float16(lin.tensors["weight_scale"])
    q = [n for n in g.graph.node if n.op_type == "QuantizeLinear"]
    s_in = numpy_helper.to_array(inits[q[0].input[1]])
    assert s_in.dtype == np.float16 and s_in.shape == () and s_in == np.float16(4.0 / 448)
    opset = next(o.version for o in g.opset_import if o.domain == "")
    if opset >= 21:  # output_dtype=17 (0.10, 0.11); below, the FLOAT8E4M3FN zero point says it
        assert all(len(n.input) == 2 and n.attribute[0].i == 17 for n in q)
    else:
        assert all(len(n.input) == 3 and inits[n.input[2]].data_type == onnx.TensorProto.FLOAT8E4M3FN for n in q)
    entries = run.report.features["wa_quant"]["linears"]
    assert sum(e["wa"] == "fp8" for e in entries) == 14
    assert [e["reason"] for e in entries if not e["wa"]] == ["lm_head stays fp16"]


def test_corrupted_folder_fails_verify(exported, fp8_ckpt, tmp_path):
    """A weight scale doubled and an input scale halved in the written graph: verify names both linears."""
    out, _ = exported["edgellm-0.11"]
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    g = onnx.load(str(bad / "model.onnx"))
    for t in g.graph.initializer:
        if t.name == "/model/layers.1/mlp/down_proj/weight_scale":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float16(2), t.name))
        if t.name == "/model/layers.0/self_attn/o_proj/input_scale":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) / np.float16(2), t.name))
    onnx.save(g, str(bad / "model.onnx"))
    res = verify(bad, model=str(fp8_ckpt), quiet=True)
    assert not res.passed
    assert any("layers.1.mlp.down_proj: the graph's dequantized weight differs" in p for p in res.problems)
    assert any("layers.0.self_attn.o_proj: the graph's input scale" in p for p in res.problems)


@pytest.mark.parametrize("argv, words", [
    (["--target", "edgellm-0.5"], "target edgellm-0.5 has no weight+activation quantization"),
    (["--dtype", "float32"], "needs --dtype float16")])
def test_refused_before_the_load(fp8_ckpt, tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    code = cli.main(["export", "--model", str(fp8_ckpt), "--output-dir", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "export:" not in err  # refused before the export stage
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: FP8 W8A8 checkpoint") and words in last
    assert not out.exists()


def test_verify_baseline_refuses_fp8_folder(exported):
    out, _ = exported["edgellm-0.11"]
    with pytest.raises(RewriteError, match="cannot simulate the folder's activation quantization"):
        verify(out, baseline=str(out.parent / "baseline" / "model.onnx"), quiet=True)


@pytest.mark.slow
def test_fp8_with_kv_scales_on_010(models, tmp_path):
    """The checkpoint's k/v scales with --kv-cache fp8, on edgellm-0.10: both quantizations verify together."""
    ck = tiny_quant.write("fp8", models.checkpoint("qwen2"), tmp_path / "ck", kv_scales=(0.05, 0.06))
    export(str(ck), tmp_path / "out", target="edgellm-0.10", kv_cache="fp8")
    res = verify(tmp_path / "out", model=str(ck), quiet=True)
    assert res.passed and res.quantized == "FP8 activation + FP8 KV cache", res.table()


def test_vlm_route_never_reads_a_quantized_checkpoint(fp8_ckpt):
    """The VLM loader (export and verify of Qwen*-VL) checks the format first: transformers would take an FP8
    checkpoint's codes for weights."""
    from onnx_rewriter.hf.vlm import load_vlm

    with pytest.raises(RewriteError, match="ModelOpt FP8 checkpoint.*reads unquantized checkpoints only"):
        load_vlm(str(fp8_ckpt))


def _with_fp8_weight_dq(base_model, dst):
    """A copy of a plain baseline folder whose first linear reads its weight through DequantizeLinear(FP8)."""
    from onnx import TensorProto as T
    from onnx import helper as h

    from onnx_rewriter.reference import wa_codecs as C

    shutil.copytree(base_model.parent, dst)
    m = onnx.load(str(base_model))
    inits = {i.name: i for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    node = next(n for n in m.graph.node if n.op_type == "MatMul")
    src = producer[node.input[1]] if node.input[1] in producer else node
    slot = 0 if src is not node else 1
    w = numpy_helper.to_array(inits[src.input[slot]])
    s = np.float32(np.abs(w).max() / 448)
    m.graph.initializer.extend([h.make_tensor("w_fp8", T.FLOAT8E4M3FN, list(w.shape), C.e4m3_encode(w / s).tobytes(),
                                              raw=True), numpy_helper.from_array(np.array(s, np.float32), "w_scale")])
    m.graph.node.insert(list(m.graph.node).index(src), h.make_node("DequantizeLinear", ["w_fp8", "w_scale"], ["w_dq"],
                                                                  name="weight_dq"))
    src.input[slot] = "w_dq"
    onnx.save(m, str(dst / "model.onnx"))
    return dst / "model.onnx"


def test_weight_only_qdq_in_the_input_graph_is_refused(models, tmp_path):
    """A baseline that is already quantized is never folded into fp16 weights: a weight-only FP8 DequantizeLinear
    has no runtime form, refused by name on every target (features/wa_onnx_in.py reads the W+A pairs)."""
    from onnx_rewriter import rewrite
    from onnx_rewriter.errors import UnsupportedModel

    base = _with_fp8_weight_dq(models.baseline("llama"), tmp_path / "base")
    for target in ("edgellm-0.5", "edgellm-0.11"):
        with pytest.raises(UnsupportedModel, match="MatMul '.*': only its weight is quantized"):
            rewrite(base, tmp_path / target, target=target)
        assert not (tmp_path / target).exists()


# ---------------------------------------------------------------------------------------------- INT8-SQ


@pytest.fixture(scope="module")
def int8_ckpt(models, tmp_path_factory):
    return _modelopt_ckpt(models, tmp_path_factory, "int8_sq")


@pytest.fixture(scope="module")
def int8_out(int8_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8_out") / "edgellm-0.9"
    export(str(int8_ckpt), out, target="edgellm-0.9")  # opset 20: the Cast-to-fp32 and zero-point forms
    return out


def test_int8_sq_export_verifies_and_holds_the_checkpoint(int8_out, int8_ckpt):
    res = verify(int8_out, model=str(int8_ckpt), quiet=True)
    assert res.passed, res.table() + "\n" + "\n".join(res.problems)
    assert res.quantized == "INT8-SQ activation" and not res.problems
    g = onnx.load(str(int8_out / "model.onnx"))
    ops = collections.Counter(n.op_type for n in g.graph.node)
    # one act() chain per input (q/k/v and gate/up share their pre_quant_scale): 8; 14 weight DQs
    assert ops["QuantizeLinear"] == 8 and ops["DequantizeLinear"] == 8 + 14
    inits = {t.name: t for t in g.graph.initializer}
    producer = {o: n for n in g.graph.node for o in n.output}
    ck = W.Checkpoint(int8_ckpt, W.detect(int8_ckpt))
    lin = ck.linear("model.layers.1.mlp.down_proj")
    w = inits["/model/layers.1/mlp/down_proj/weight"]
    assert w.data_type == onnx.TensorProto.INT8 and w.raw_data == lin.tensors["weight"].tobytes()
    s_w = numpy_helper.to_array(inits["/model/layers.1/mlp/down_proj/weight_scale"])
    assert s_w.dtype == np.float32 and np.array_equal(s_w, lin.tensors["weight_scale"])
    q = next(n for n in g.graph.node if n.op_type == "QuantizeLinear")
    assert producer[q.input[0]].op_type == "Cast" and producer[producer[q.input[0]].input[0]].op_type == "Mul"
    assert inits[q.input[2]].data_type == onnx.TensorProto.INT8  # opset 20: the zero point names int8
    assert numpy_helper.to_array(inits[q.input[1]]).dtype == np.float32


def test_int8_sq_wrong_pre_quant_scale_fails_verify(int8_out, int8_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(int8_out, bad)
    g = onnx.load(str(bad / "model.onnx"))
    for t in g.graph.initializer:
        if t.name == "/model/layers.0/mlp/down_proj/pre_quant_scale":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t)[::-1].copy(), t.name))
    onnx.save(g, str(bad / "model.onnx"))
    res = verify(bad, model=str(int8_ckpt), quiet=True)
    assert not res.passed
    assert any("layers.0.mlp.down_proj: the graph's pre_quant_scale is not the checkpoint's" in p for p in res.problems)


@pytest.mark.slow
def test_int8_sq_on_011(int8_ckpt, tmp_path):
    export(str(int8_ckpt), tmp_path / "out", target="edgellm-0.11")
    res = verify(tmp_path / "out", model=str(int8_ckpt), quiet=True)
    assert res.passed, res.table()


# ---------------------------------------------------------------------------------------------- NVFP4


@pytest.fixture(scope="module")
def nvfp4_ckpt(models, tmp_path_factory):
    return _modelopt_ckpt(models, tmp_path_factory, "nvfp4", signal="hf_quant_config")


@pytest.fixture(scope="module")
def nvfp4_out(nvfp4_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("nvfp4_out") / "edgellm-0.11"
    # --external-data: the FLOAT4E2M1 weights (4096 codes, 2048 bytes each) are streamed into model.onnx.data
    export(str(nvfp4_ckpt), out, target="edgellm-0.11", external_data=True)
    return out


def _nvfp4_base(module: str) -> str:
    return "/" + module.replace("model.layers.", "model/layers.").replace(".self_attn.", "/self_attn/") \
        .replace(".mlp.", "/mlp/")


def test_nvfp4_export_verifies(nvfp4_out, nvfp4_ckpt):
    res = verify(nvfp4_out, model=str(nvfp4_ckpt), quiet=True)
    assert res.passed, res.table() + "\n" + "\n".join(res.problems)
    assert res.criterion.startswith("W4A4") and not res.problems and res.quantized == "NVFP4 activation"
    ours = np.mean([1 - s.cosine for s in res.ours_vs_original])
    twin = np.mean([1 - s.cosine for s in res.quantization])
    assert ours <= 2 * twin + 0.002 and twin > 0  # measured: 0.0399 vs 0.0382


def test_nvfp4_graph_holds_the_checkpoints_bytes_and_scales(nvfp4_out, nvfp4_ckpt):
    g = onnx.load(str(nvfp4_out / "model.onnx"))  # external data loaded: the stored FP4 bytes are compared
    assert {(o.domain, o.version) for o in g.opset_import} >= {("", 24), ("trt", 1), ("trt_edgellm", 1)}
    ops = collections.Counter((n.domain, n.op_type) for n in g.graph.node)
    # 8 act() chains (q/k/v, o, gate/up, down per layer): FP4DynamicQuantize + 2 trt::DequantizeLinear each;
    # 14 weights: DequantizeLinear of the block scales, then of the codes; 14 + 1 MatMuls (lm_head fp16)
    assert ops[("trt", "TRT_FP4DynamicQuantize")] == 8 and ops[("trt", "DequantizeLinear")] == 16
    assert ops[("", "DequantizeLinear")] == 28 and ops[("", "QuantizeLinear")] == 0 and ops[("", "MatMul")] == 15
    inits = {t.name: t for t in g.graph.initializer}
    ck = W.Checkpoint(nvfp4_ckpt, W.detect(nvfp4_ckpt))
    for module in ck.linears:
        lin, base = ck.linear(module), _nvfp4_base(module)
        n, k = lin.shape
        w = inits[f"{base}/weight"]
        assert w.data_type == onnx.TensorProto.FLOAT4E2M1 and list(w.dims) == [n, k]
        # onnx's own unpacking reads the checkpoint's codes (even k in the low nibble)
        from onnx_rewriter.reference import wa_codecs as C
        assert np.array_equal(numpy_helper.to_array(w).view(np.uint8), C.unpack_fp4(lin.tensors["weight"]))
        assert w.raw_data == lin.tensors["weight"].tobytes()  # the checkpoint's packed bytes, verbatim
        s_blk = inits[f"{base}/weight_scale"]
        assert s_blk.data_type == onnx.TensorProto.FLOAT8E4M3FN and list(s_blk.dims) == [n, k // 16]
        assert s_blk.raw_data == lin.tensors["weight_scale"].tobytes()
        s_g = numpy_helper.to_array(inits[f"{base}/weight_scale_2"])
        assert s_g.dtype == np.float32 and s_g.shape == () and s_g == lin.tensors["weight_scale_2"].reshape(-1)[0]
    q = next(n for n in g.graph.node if n.op_type == "TRT_FP4DynamicQuantize")
    assert {a.name: a.i for a in q.attribute} == {"axis": -1, "block_size": 16, "scale_type": 17}
    s_in = numpy_helper.to_array(inits[q.input[1]])
    assert s_in.dtype == np.float32 and s_in.shape == () and s_in == np.float32(4.0 / (6 * 448))


def _corrupt_weight(out, dst, module: str, name: str, fix) -> None:
    shutil.copytree(out, dst)
    g = onnx.load(str(dst / "model.onnx"))
    for t in g.graph.initializer:
        if t.name == f"{_nvfp4_base(module)}/{name}":
            raw = np.frombuffer(t.raw_data, np.uint8).reshape(t.dims[0], -1)
            t.raw_data = np.ascontiguousarray(fix(raw)).tobytes()
    onnx.save(g, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")


@pytest.mark.parametrize("what, name, fix", [
    ("block scale on the wrong 16-block", "weight_scale", lambda s: s[:, ::-1]),
    ("nibble order swapped", "weight", lambda w: (w << 4) | (w >> 4))])
def test_nvfp4_corrupted_weight_fails_verify(nvfp4_out, nvfp4_ckpt, tmp_path, what, name, fix):
    """The blocks of one linear's E4M3 scales reversed, or its FP4 codes with their nibbles swapped: verify names it."""
    module = "model.layers.1.mlp.down_proj"
    _corrupt_weight(nvfp4_out, tmp_path / "bad", module, name, fix)
    res = verify(tmp_path / "bad", model=str(nvfp4_ckpt), quiet=True)
    assert not res.passed, what
    assert any(f"NVFP4 linear {module}: the graph's dequantized weight differs" in p for p in res.problems), what


@pytest.mark.parametrize("target, words", [
    ("edgellm-0.5", "target edgellm-0.5 has no weight+activation quantization")])  # 0.9: tests/test_wa_formats.py
def test_nvfp4_refused_before_the_load(nvfp4_ckpt, tmp_path, capsys, target, words):
    out = tmp_path / "out"
    code = cli.main(["export", "--model", str(nvfp4_ckpt), "--output-dir", str(out), "--target", target])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "export:" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: NVFP4 W4A4 checkpoint") and words in last
    assert not out.exists()


@pytest.mark.slow
def test_nvfp4_qwen2_on_010(models, tmp_path):
    ck = tiny_quant.write("nvfp4", models.checkpoint("qwen2"), tmp_path / "ck")
    export(str(ck), tmp_path / "out", target="edgellm-0.10")
    res = verify(tmp_path / "out", model=str(ck), quiet=True)
    assert res.passed and res.quantized == "NVFP4 activation", res.table() + "\n" + "\n".join(res.problems)
