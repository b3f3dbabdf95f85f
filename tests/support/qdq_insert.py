"""Q/DQ pairs written into a tiny model's plain fp32 export, the way ModelOpt's ONNX path and onnxruntime's static
QDQ quantizer place them (tests of features/wa_onnx_in.py; no GPU, no ModelOpt).

Per linear (every MatMul with a 2-D weight initializer but lm_head), its own chain:
- FP8 (ModelOpt): x -> QuantizeLinear(s_in, FLOAT8E4M3FN zero point) -> DequantizeLinear -> MatMul, the weight an
  FLOAT8E4M3FN [N, K] initializer -> DequantizeLinear(s_w) -> Transpose(perm=[1, 0]); s_in = amax(x) / 448 over a
  couple of calibration rows, s_w = amax(W) / 448 (fp32). `fake_weight`: the fp32 weight [K, N] stays, through
  QuantizeLinear -> DequantizeLinear (a torch export of a fake-quantized linear).
- INT8-SQ (ModelOpt / onnxruntime): Mul(x, pre_quant_scale) -> int8 Q/DQ (per tensor) -> MatMul, the weight
  W / pre_quant_scale as int8 [K, N] codes with one scale per output channel (DequantizeLinear axis=1, no
  Transpose: onnxruntime's form); pre_quant_scale = SmoothQuant's (amax_x^0.5 / amax_w^0.5)^-1, fp16 values.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from onnx_rewriter.reference import wa_codecs as C


def _linears(model, vocab: int):
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2 \
                and inits[n.input[1]].dims[1] != vocab:
            yield n, inits[n.input[1]]


def _amax(path: Path, names: list[str], vocab: int, rows: int = 2) -> dict:
    """Per-channel amax of the named tensors over `rows` seeded prompts (the baseline in onnxruntime)."""
    import onnxruntime as ort

    m = onnx.load(str(path))
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(h.make_empty_tensor_value_info(x) for x in names if x not in have)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds_names = [i.name for i in sess.get_inputs()]
    rng = np.random.default_rng(7)
    out: dict = {}
    for _ in range(rows):
        ids = rng.integers(3, vocab, (1, 9))
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(9)[None]}
        res = sess.run(names, {k: v for k, v in feeds.items() if k in feeds_names})
        for name, x in zip(names, res):
            a = np.abs(np.asarray(x, np.float32)).reshape(-1, x.shape[-1]).max(axis=0)
            out[name] = a if name not in out else np.maximum(out[name], a)
    return out


def insert_qdq(src: Path, dst: Path, scheme, fake_weight: bool = False, fp32_qdq: bool = False) -> Path:
    """A copy of the baseline folder `src` (its model.onnx) in `dst` with every linear quantized: scheme "fp8" or
    "int8_sq" (or a function of the linear's index returning one: a mixed graph). `fp32_qdq` (INT8-SQ of an fp16
    export): the pairs in fp32 between Casts, fp32 scales (the form of QuantizeLinear below opset 23, whose x and
    scale share one type). Returns dst / "model.onnx"."""
    import json

    shutil.copytree(Path(src).parent, dst)
    vocab = int(json.loads((dst / "config.json").read_text())["vocab_size"])
    m = onnx.load(str(src))
    lins = list(_linears(m, vocab))
    amax = _amax(src, sorted({n.input[0] for n, _ in lins}), vocab)
    nodes, inits = [], []
    drop = set()
    for i, (mm, w_init) in enumerate(lins):
        w = numpy_helper.to_array(w_init).astype(np.float32)  # [K, N]
        f = numpy_helper.to_array(w_init).dtype.type  # scales in the graph's float type (x and scale: one type)
        x, tag = mm.input[0], f"qdq{i}"
        if (scheme(i) if callable(scheme) else scheme) == "fp8":
            s_in = f(amax[x].max() / C.E4M3_MAX)
            s_w = f(np.abs(w).max() / C.E4M3_MAX)
            inits += [numpy_helper.from_array(np.array(s_in), f"{tag}_s_in"),
                      numpy_helper.from_array(np.array(s_w), f"{tag}_s_w"),
                      h.make_tensor(f"{tag}_zp", T.FLOAT8E4M3FN, [], [0])]
            nodes += [h.make_node("QuantizeLinear", [x, f"{tag}_s_in", f"{tag}_zp"], [f"{tag}_xq"], name=f"{tag}_q"),
                      h.make_node("DequantizeLinear", [f"{tag}_xq", f"{tag}_s_in", f"{tag}_zp"], [f"{tag}_xd"],
                                  name=f"{tag}_dq")]
            if fake_weight:  # fp32 weight -> Q -> DQ (torch's fake-quantized linear)
                nodes += [h.make_node("QuantizeLinear", [w_init.name, f"{tag}_s_w", f"{tag}_zp"], [f"{tag}_wq"],
                                      name=f"{tag}_wq"),
                          h.make_node("DequantizeLinear", [f"{tag}_wq", f"{tag}_s_w", f"{tag}_zp"], [f"{tag}_wd"],
                                      name=f"{tag}_wdq")]
                wt = f"{tag}_wd"
            else:
                codes = C.e4m3_encode(w.T / np.float32(s_w))  # [N, K]
                inits.append(h.make_tensor(f"{tag}_w", T.FLOAT8E4M3FN, list(codes.shape), codes.tobytes(), raw=True))
                nodes += [h.make_node("DequantizeLinear", [f"{tag}_w", f"{tag}_s_w"], [f"{tag}_wd"], name=f"{tag}_wdq"),
                          h.make_node("Transpose", [f"{tag}_wd"], [f"{tag}_wt"], perm=[1, 0], name=f"{tag}_wt")]
                wt = f"{tag}_wt"
                drop.add(w_init.name)
        else:
            a_w = np.maximum(np.abs(w).max(axis=1), 1e-6)  # [K]
            p = np.sqrt(np.maximum(amax[x], 1e-6)) / np.sqrt(a_w)
            pqs = (1 / (p / np.exp(np.log(p).mean()))).astype(np.float16).astype(f)
            f_q = np.float32 if fp32_qdq else f
            s_in = f_q((amax[x] * pqs).max() / 127)
            wp = w / pqs.astype(np.float32)[:, None]
            s_w = (np.abs(wp).max(axis=0) / 127).astype(f_q)  # [N]
            codes = np.clip(np.rint(wp / s_w.astype(np.float32)[None, :]), -128, 127).astype(np.int8)  # [K, N]
            inits += [numpy_helper.from_array(pqs, f"{tag}_pqs"),
                      numpy_helper.from_array(np.array(s_in), f"{tag}_s_in"),
                      numpy_helper.from_array(np.array(0, np.int8), f"{tag}_zp"),
                      numpy_helper.from_array(s_w, f"{tag}_s_w"), numpy_helper.from_array(codes, f"{tag}_w")]
            c = "_c" if fp32_qdq else ""  # the Cast-wrapped tensors' suffix
            nodes += [h.make_node("Mul", [x, f"{tag}_pqs"], [f"{tag}_xs"], name=f"{tag}_smooth"),
                      h.make_node("QuantizeLinear", [f"{tag}_xs{c}", f"{tag}_s_in", f"{tag}_zp"], [f"{tag}_xq"],
                                  name=f"{tag}_q"),
                      h.make_node("DequantizeLinear", [f"{tag}_xq", f"{tag}_s_in", f"{tag}_zp"], [f"{tag}_xd{c}"],
                                  name=f"{tag}_dq"),
                      h.make_node("DequantizeLinear", [f"{tag}_w", f"{tag}_s_w"], [f"{tag}_wt{c}"], axis=1,
                                  name=f"{tag}_wdq")]
            if fp32_qdq:
                nodes += [h.make_node("Cast", [f"{tag}_xs"], [f"{tag}_xs_c"], to=T.FLOAT, name=f"{tag}_cast_in"),
                          h.make_node("Cast", [f"{tag}_xd_c"], [f"{tag}_xd"], to=T.FLOAT16, name=f"{tag}_cast_out"),
                          h.make_node("Cast", [f"{tag}_wt_c"], [f"{tag}_wt"], to=T.FLOAT16, name=f"{tag}_cast_w")]
            wt = f"{tag}_wt"
            drop.add(w_init.name)
        mm.input[0], mm.input[1] = f"{tag}_xd", wt
    kept = [t for t in m.graph.initializer if t.name not in drop]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept + inits)
    order = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes + order)  # Q/DQ read initializers or earlier tensors: sorted below
    _toposort(m.graph)
    for f in dst.glob("model.onnx*"):
        f.unlink()
    onnx.save(m, str(dst / "model.onnx"))
    onnx.checker.check_model(str(dst / "model.onnx"))
    return dst / "model.onnx"


def _toposort(g) -> None:
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending, done = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in known for i in n.input):
                done.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError("cycle")
        pending = rest
    del g.node[:]
    g.node.extend(done)



def ort_quantized(src: Path, dst: Path, outputs: bool = False) -> Path:
    """The baseline folder `src` (its model.onnx) through onnxruntime's own static quantizer into `dst`: QDQ format,
    int8 symmetric activations (per tensor) and weights (per output channel), the decoder's linear MatMuls only
    (not lm_head), two calibration rows. `outputs`: onnxruntime's default, the linears' outputs quantized too."""
    import json

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    shutil.copytree(Path(src).parent, dst)
    for f in dst.glob("model.onnx*"):
        f.unlink()
    vocab = int(json.loads((dst / "config.json").read_text())["vocab_size"])
    names = [n.name for n, _ in _linears(onnx.load(str(src), load_external_data=False), vocab)]

    class Rows(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(7)
            ids = [rng.integers(3, vocab, (1, 9)) for _ in range(2)]
            self.rows = iter([{"input_ids": i, "attention_mask": np.ones_like(i)} for i in ids])

        def get_next(self):
            return next(self.rows, None)

    extra = {"ActivationSymmetric": True, "WeightSymmetric": True}
    if not outputs:
        extra["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
    quantize_static(str(src), str(dst / "model.onnx"), Rows(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    nodes_to_quantize=names, op_types_to_quantize=["MatMul"], extra_options=extra)
    return dst / "model.onnx"
