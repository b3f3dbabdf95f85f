"""Already-quantized Q/DQ ONNX in (features/wa_onnx_in.py): a plain export carrying FP8 / INT8-SQ Q/DQ pairs around
its linears (tests/support/qdq_insert.py, as ModelOpt's ONNX path and onnxruntime's quantizer write them) comes out
in the contract's form with the input's codes verbatim and its scales cast as the contract says, verifies against
the Q/DQ baseline itself (`verify --baseline`), and what the feature does not understand is refused by name."""

from __future__ import annotations

import collections
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from onnx_rewriter import rewrite
from onnx_rewriter.errors import UnsupportedModel
from onnx_rewriter.reference import wa_codecs as C
from onnx_rewriter.verification.llm import verify
from tests.support.qdq_insert import insert_qdq, ort_quantized


@pytest.fixture(scope="module")
def qdq_inputs(models, tmp_path_factory):
    base = models.baseline("llama")
    root = tmp_path_factory.mktemp("qdq_in")
    return {s: insert_qdq(base, root / s, s) for s in ("fp8", "int8_sq")}


def _arrays(path) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _input_linears(path) -> list[dict]:
    """The baseline's own Q/DQ linears, read here from the proto (not by the module under test)."""
    m = onnx.load(str(path))
    a = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    out = []
    for mm in (n for n in m.graph.node if n.op_type == "MatMul" and n.input[0] in prod
               and prod[n.input[0]].op_type == "DequantizeLinear"):
        q = prod[prod[mm.input[0]].input[0]]
        w = prod[mm.input[1]]
        w = prod[w.input[0]] if w.op_type == "Transpose" else w
        codes = a[w.input[0]]
        pqs = prod.get(q.input[0])
        out.append({"s_in": a[q.input[1]], "s_w": a[w.input[1]],
                    "codes": codes.view(np.uint8) if codes.dtype.itemsize == 1 and codes.dtype.kind == "V" else codes,
                    "pqs": a.get(pqs.input[1]) if pqs is not None and pqs.op_type == "Mul" else None})
    return out


def _output_linears(out) -> list[dict]:
    m = onnx.load(str(out / "model.onnx"))
    a = {t.name: t for t in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    res = []
    for wdq in (n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in a
                and a[n.input[0]].data_type in (T.FLOAT8E4M3FN, T.INT8)):
        mm = next(n for n in m.graph.node if n.op_type == "MatMul" and prod.get(n.input[1]) is not None and (
            prod[n.input[1]].input[0] in wdq.output or prod[prod[n.input[1]].input[0]].input[0] in wdq.output))
        x = mm.input[0]
        while prod[x].op_type in ("Cast", "DequantizeLinear"):
            x = prod[x].input[0]
        q = prod[x] if prod[x].op_type == "QuantizeLinear" else None
        pre = prod.get(q.input[0])
        pre = prod.get(pre.input[0]) if pre is not None and pre.op_type == "Cast" else pre
        codes = np.frombuffer(a[wdq.input[0]].raw_data, np.uint8 if a[wdq.input[0]].data_type == T.FLOAT8E4M3FN
                              else np.int8).reshape(tuple(a[wdq.input[0]].dims))
        res.append({"name": mm.name, "codes": codes, "s_w": numpy_helper.to_array(a[wdq.input[1]]),
                    "s_in": numpy_helper.to_array(a[q.input[1]]),
                    "pqs": numpy_helper.to_array(a[pre.input[1]]) if pre is not None and pre.op_type == "Mul"
                    and pre.input[1] in a else None})
    return res


def _by_codes(lins):
    return {lin["codes"].tobytes(): lin for lin in lins}


def test_fp8_qdq_input_becomes_the_contract_form_and_verifies_against_itself(qdq_inputs, tmp_path):
    src = qdq_inputs["fp8"]
    run = rewrite(src, tmp_path / "out", target="edgellm-0.11")
    g = onnx.load(str(tmp_path / "out" / "model.onnx"))
    ops = collections.Counter(n.op_type for n in g.graph.node)
    # as from a ModelOpt FP8 checkpoint: 8 act() chains (q/k/v and gate/up share theirs), 14 weight DQs
    assert ops["QuantizeLinear"] == 8 and ops["DequantizeLinear"] == 8 + 14 and ops["MatMul"] == 15
    assert run.report.features["wa_quant"]["source"] == "Q/DQ ONNX input"
    theirs = _by_codes(_input_linears(src))  # the FP8 codes [N, K] verbatim
    ours = _output_linears(tmp_path / "out")
    assert len(ours) == 14 and all(o["codes"].tobytes() in theirs for o in ours)
    for o in ours:  # FP8 scales are the input's fp32 ones cast to fp16 (contract 16.3): the activation's own
        t = theirs[o["codes"].tobytes()]
        assert o["s_in"].dtype == np.float16 and o["s_in"] == np.float16(t["s_in"]), o["name"]
        assert o["s_w"] == np.float16(t["s_w"]) and o["pqs"] is None
    res = verify(tmp_path / "out", baseline=str(src), quiet=True)
    assert res.passed and not res.problems, res.table() + "\n" + "\n".join(res.problems)
    assert "against the Q/DQ baseline" in res.criterion and res.quantized == "FP8 activation"
    # the cost reference is the baseline without its activation Q/DQ: the baseline's own cost is not zero
    assert np.mean([1 - s.cosine for s in res.quantization]) > 1e-3  # measured 0.0041 (ours 0.0039)
    # the oracle is the quantized baseline itself: our steps are close to it (fp16 vs fp32 activations flip a few
    # E4M3 codes), closer than the baseline is to its unquantized-activation self
    assert min(s.cosine for s in res.steps) > 0.99


def test_int8_sq_qdq_input_on_09_keeps_codes_scales_and_smoothing(qdq_inputs, tmp_path):
    src = qdq_inputs["int8_sq"]
    rewrite(src, tmp_path / "out", target="edgellm-0.9")
    theirs = _input_linears(src)
    ours = _output_linears(tmp_path / "out")
    assert len(ours) == 14
    # onnxruntime's form [K, N] with per-column scales (axis 1) -> the contract's [N, K], per-row scales (axis 0)
    by_codes = {t["codes"].T.tobytes(): t for t in theirs}
    for o in ours:
        t = by_codes[o["codes"].tobytes()]
        assert o["s_w"].dtype == np.float32 and np.array_equal(o["s_w"], t["s_w"]), o["name"]
        assert o["s_in"].dtype == np.float32 and o["s_in"] == t["s_in"]
        assert np.array_equal(o["pqs"], t["pqs"].astype(np.float16))  # one Mul per projection: pqs differ
    res = verify(tmp_path / "out", baseline=str(src), quiet=True)
    assert res.passed and not res.problems, res.table() + "\n" + "\n".join(res.problems)


def test_fake_quantized_fp32_weight_is_read_through_its_own_quantizer(models, tmp_path):
    """fp32 W -> QuantizeLinear -> DequantizeLinear (a torch export of a fake-quantized linear): the codes are the
    graph's own QuantizeLinear of W (what onnxruntime computes), and the folder verifies against that graph."""
    src = insert_qdq(models.baseline("llama"), tmp_path / "in", "fp8", fake_weight=True)
    rewrite(src, tmp_path / "out", target="edgellm-0.10")
    a = _arrays(src)
    w = a["val_44"].astype(np.float32)  # layer 0 q_proj's fp32 weight [K, N] and its scale
    codes = C.e4m3_encode(w.T / a["qdq0_s_w"])
    assert any(o["codes"].tobytes() == codes.tobytes() for o in _output_linears(tmp_path / "out"))
    assert verify(tmp_path / "out", baseline=str(src), quiet=True).passed


def test_onnxruntime_quantize_static_output_verifies(models, tmp_path):
    """A real third-party Q/DQ graph: onnxruntime's quantize_static (QDQ, int8 symmetric, per-channel weights [K, N]
    on axis 1, one activation pair per input tensor shared by q/k/v and gate/up) becomes INT8-SQ without
    pre_quant_scale and verifies against itself; its default (the linears' outputs quantized too) is refused."""
    src = ort_quantized(models.baseline("llama"), tmp_path / "in")
    rewrite(src, tmp_path / "out", target="edgellm-0.9")
    assert len(_output_linears(tmp_path / "out")) == 14
    res = verify(tmp_path / "out", baseline=str(src), quiet=True)
    assert res.passed and not res.problems, res.table() + "\n" + "\n".join(res.problems)
    both = ort_quantized(models.baseline("llama"), tmp_path / "in_outputs", outputs=True)
    with pytest.raises(UnsupportedModel, match=r"it quantizes the output of MatMul '.*'.*OpTypesToExcludeOutput"):
        rewrite(both, tmp_path / "out2", target="edgellm-0.9")


def test_onnxruntime_dynamic_quantization_is_refused(models, tmp_path):
    """quantize_dynamic's QOperator graph (DynamicQuantizeLinear + MatMulInteger) is no Q/DQ pair: refused by node,
    not passed through as unknown integer ops."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = models.baseline("llama")
    shutil.copytree(src.parent, tmp_path / "in")
    (tmp_path / "in" / "model.onnx").unlink()
    quantize_dynamic(str(src), str(tmp_path / "in" / "model.onnx"), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"])
    with pytest.raises(UnsupportedModel, match=r"onnxruntime's QOperator / dynamic quantization format"):
        rewrite(tmp_path / "in" / "model.onnx", tmp_path / "out", target="edgellm-0.11")
    assert not (tmp_path / "out").exists()


def test_edgellm_05_refuses_a_qdq_input_by_name(qdq_inputs, tmp_path):
    with pytest.raises(UnsupportedModel, match=r"Q/DQ ONNX input \(INT8-SQ W8A8\): target edgellm-0.5 has no "
                                               r"weight\+activation quantization"):
        rewrite(qdq_inputs["int8_sq"], tmp_path / "out", target="edgellm-0.5")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["fp8", "int4"])
def test_quantize_on_a_qdq_input_is_refused(qdq_inputs, tmp_path, flag):
    with pytest.raises(UnsupportedModel, match=f"--quantize {flag}: the input graph is already quantized"):
        rewrite(qdq_inputs["fp8"], tmp_path / "out", target="edgellm-0.11", quantize=flag)
    assert not (tmp_path / "out").exists()


def _edited(src, dst, edit):
    shutil.copytree(src.parent, dst)
    m = onnx.load(str(src))
    edit(m)
    onnx.save(m, str(dst / "model.onnx"))
    return dst / "model.onnx"


def _uint8_activation(m):
    zp = next(t for t in m.graph.initializer if t.name == "qdq3_zp")
    zp.CopyFrom(h.make_tensor("qdq3_zp", T.UINT8, [], [128]))


def _per_channel_activation(m):
    s = next(t for t in m.graph.initializer if t.name == "qdq3_s_in")
    v = float(numpy_helper.to_array(s))
    s.CopyFrom(numpy_helper.from_array(np.full(64, v, np.float32), "qdq3_s_in"))
    for n in m.graph.node:
        if n.name in ("qdq3_q", "qdq3_dq"):
            n.attribute.append(h.make_attribute("axis", -1))


def _weight_only(m):
    mm = next(n for n in m.graph.node if "qdq3_xd" in n.input)
    mm.input[0] = next(n for n in m.graph.node if n.name == "qdq3_q").input[0]


def _on_a_non_linear(m):
    sig = next(n for n in m.graph.node if n.op_type == "Sigmoid")
    x = sig.input[0]
    m.graph.node.extend([h.make_node("QuantizeLinear", [x, "qdq0_s_in", "qdq0_zp"], ["odd_q"], name="odd_q"),
                         h.make_node("DequantizeLinear", ["odd_q", "qdq0_s_in", "qdq0_zp"], ["odd_dq"], name="odd_dq")])
    sig.input[0] = "odd_dq"
    nodes = list(m.graph.node)
    from tests.support.qdq_insert import _toposort
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    _toposort(m.graph)


def _trt_domain(m):
    next(n for n in m.graph.node if n.name == "qdq3_wdq").domain = "trt"
    m.opset_import.append(h.make_opsetid("trt", 1))


def _trt_fp8_op(m):
    q = next(n for n in m.graph.node if n.name == "qdq3_q")
    q.op_type, q.domain = "TRT_FP8QuantizeLinear", "trt"
    m.opset_import.append(h.make_opsetid("trt", 1))


@pytest.mark.parametrize("edit,reason", [
    (_uint8_activation, r"QuantizeLinear 'qdq3_q': uint8 activation \(onnxruntime's asymmetric default\)"),
    (_per_channel_activation, r"QuantizeLinear 'qdq3_q': a per-channel activation scale \[64\]"),
    (_weight_only, r"MatMul '.*': only its weight is quantized"),
    (_on_a_non_linear, r"QuantizeLinear 'odd_q': not on a linear's input \(its pair feeds Sigmoid\)"),
    (_trt_domain, r"DequantizeLinear 'qdq3_wdq': a trt:: Q/DQ op .*export the ModelOpt checkpoint instead"),
    (_trt_fp8_op, r"TRT_FP8QuantizeLinear 'qdq3_q': a trt::TRT_FP8QuantizeLinear node, not a standard Q/DQ pair"),
], ids=["uint8", "per_channel_act", "weight_only", "non_linear", "trt", "trt_fp8_op"])
def test_qdq_it_does_not_understand_is_refused_by_name(qdq_inputs, tmp_path, edit, reason):
    src = _edited(qdq_inputs["fp8"], tmp_path / "in", edit)
    with pytest.raises(UnsupportedModel, match=reason):
        rewrite(src, tmp_path / "out", target="edgellm-0.11")
    assert not (tmp_path / "out").exists()


def test_onnxruntime_fp8_quantize_rounds_and_saturates_as_the_reference():
    """verify --baseline trusts onnxruntime's CPU QuantizeLinear to FLOAT8E4M3FN: it gives the contract's E4M3
    bytes (16.6), saturates at 448 (inf included), rounds ties to even, as reference/wa_codecs.py does."""
    import onnxruntime as ort

    g = h.make_graph([h.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [None])],
                     [h.make_tensor_value_info("q", T.FLOAT8E4M3FN, [None])],
                     [numpy_helper.from_array(np.array(1.0, np.float32), "s"),
                      h.make_tensor("zp", T.FLOAT8E4M3FN, [], [0])])
    sess = ort.InferenceSession(h.make_model(g, opset_imports=[h.make_opsetid("", 20)], ir_version=10)
                                .SerializeToString(), providers=["CPUExecutionProvider"])
    vec = np.array([1.0, 0.5, 448, 500, 2.0 ** -9, 1 / 6, 0.003], np.float32)
    assert np.asarray(sess.run(None, {"x": vec})[0]).view(np.uint8).tolist() == [56, 48, 126, 126, 1, 35, 2]
    rng = np.random.default_rng(0)
    x = np.concatenate([(rng.standard_normal(100_000) * np.exp2(rng.integers(-12, 10, 100_000))),
                        C.E4M3_VALUES[np.isfinite(C.E4M3_VALUES)][:-1] * 1.0625,  # ties between neighbours
                        [-1e9, np.inf, -np.inf, 464.0, 2.0 ** -10]]).astype(np.float32)
    ours = np.asarray(sess.run(None, {"x": x})[0]).view(np.uint8)
    assert np.array_equal(ours, C.e4m3_encode(x))


def test_miswired_linear_fails_verify_against_the_qdq_baseline(qdq_inputs, tmp_path):
    """o_proj of layer 0 reading the q/k/v chain: its input scale is no longer its baseline linear's, and the cost
    rule fails it on its own too."""
    src = qdq_inputs["fp8"]
    rewrite(src, tmp_path / "out", target="edgellm-0.11")
    g = onnx.load(str(tmp_path / "out" / "model.onnx"))
    nodes = {n.name: n for n in g.graph.node}
    layer0 = "/model/layers.0/self_attn"
    nodes[f"{layer0}/o_proj/MatMul"].input[0] = nodes[f"{layer0}/q_proj/MatMul"].input[0]
    onnx.save(g, str(tmp_path / "out" / "model.onnx"))
    res = verify(tmp_path / "out", baseline=str(src), quiet=True)
    assert not res.passed and [p for p in res.problems if "o_proj" in p] == res.problems
    assert np.mean([1 - s.cosine for s in res.ours_vs_original]) > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("scheme,target", [("fp8", "edgellm-0.9"), ("fp8", "edgellm-0.10"), ("int8_sq", "edgellm-0.10"),
                                           ("int8_sq", "edgellm-0.11")])
def test_every_allowed_target(qdq_inputs, tmp_path, scheme, target):
    """The cells the default tests leave out (FP8 on 0.11, INT8-SQ on 0.9 and the fake-quantized weight on 0.10 are
    there): each rewrite verifies against its Q/DQ baseline."""
    rewrite(qdq_inputs[scheme], tmp_path / "out", target=target)
    res = verify(tmp_path / "out", baseline=str(qdq_inputs[scheme]), quiet=True)
    assert res.passed and not res.problems, res.table() + "\n" + "\n".join(res.problems)


@pytest.mark.slow
@pytest.mark.parametrize("scheme,fp32_qdq", [("fp8", False), ("int8_sq", False), ("int8_sq", True)])
def test_fp16_graph_with_fp16_scales(models, tmp_path, scheme, fp32_qdq):
    """An fp16 export (ModelOpt's ONNX path exports fp16 LLMs): Q/DQ on fp16 activations with fp16 scales, or (INT8)
    in fp32 between Casts with fp32 scales."""
    src = insert_qdq(models.baseline("llama", dtype="float16", native_dtype=True), tmp_path / "in", scheme,
                     fp32_qdq=fp32_qdq)
    rewrite(src, tmp_path / "out", target="edgellm-0.11")
    res = verify(tmp_path / "out", baseline=str(src), quiet=True)
    assert res.passed and not res.problems, res.table() + "\n" + "\n".join(res.problems)


@pytest.mark.slow
def test_fp8_and_int8_linears_in_one_graph(models, tmp_path):
    """Layer 0 FP8, layer 1 INT8-SQ (a mixed input): each linear in its own scheme, both targets' notes warned."""
    src = insert_qdq(models.baseline("llama"), tmp_path / "in", lambda i: "fp8" if i < 7 else "int8_sq")
    run = rewrite(src, tmp_path / "out", target="edgellm-0.10")
    assert run.report.features["wa_quant"]["scheme"] == "mixed"
    assert sum("Q/DQ ONNX input" in w for w in run.report.warnings) == 2
    res = verify(tmp_path / "out", baseline=str(src), quiet=True)
    assert res.passed and res.quantized == "FP8 + INT8-SQ activation", res.table()
