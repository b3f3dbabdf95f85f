"""Already-quantized ONNX in (W+A): a plain export whose linears carry Q/DQ pairs (ModelOpt's ONNX path,
onnxruntime's static QDQ quantizer, a torch export of a fake-quantized model) is read as contract part 3's FP8
per-tensor (16.3) or INT8 SmoothQuant (16.5) linears, and emitted by features/wa_quant.py like a checkpoint's.

`prepare` (before matching) reads, for each MatMul,

    act:  [Cast] DequantizeLinear(QuantizeLinear(x', s_in, zp), s_in, zp), x' = [Cast] [Mul(x, pqs)]
    wdq:  [Transpose(perm=[1, 0])] [Cast] DequantizeLinear(Wq, s_w, zp)     Wq a constant, or
          [Transpose(perm=[1, 0])] [Cast] DequantizeLinear(QuantizeLinear(W, s_w, zp), s_w, zp)

and makes it MatMul(x, W') with W' [K, N] the weight the input graph computes (times pqs per input channel,
as a checkpoint's traced INT8-SQ weight), a computed constant written only if the linear is not emitted. The
codes and scales are kept per weight name as a `wa_checkpoint.QuantLinear` holding exactly a ModelOpt
checkpoint's tensors (weight codes [N, K], weight_scale, input_scale, pre_quant_scale): codes verbatim from the
initializer, or the graph's own QuantizeLinear of an fp32 weight evaluated once by the reference (that is what
the input graph computes; never a fresh quantization). The feature (`QdqOnnx`, implied by Q/DQ nodes in the
input) is `wa_quant.WaQuant` with these linears: the output has exactly the contract's form.

Understood: FP8 (FLOAT8E4M3FN, zero point 0, per-tensor activation and weight scales) and INT8 (int8, zero
point 0, a per-tensor activation scale, per-tensor or per-output-channel weight scales). A `Mul(x, c)` with a
constant c [K] as its second operand right before an int8 QuantizeLinear is SmoothQuant's pre_quant_scale
*(inference: ModelOpt multiplies inside the input quantizer, x * pre_quant_scale; an HF RMSNorm multiplies
weight * x, its constant first, and is not taken)*. Anything else (uint8 or asymmetric zero points, other types,
per-channel activation scales, blocks, a weight-only or activation-only pair, FP8 with INT8, Q/DQ nodes on no
linear's input) is refused in one line naming the node and the reason, never dropped or read as FP16.

Scales: the input graph's fp32 scales go to the contract's types (FP8 scales fp16, 16.3, as a checkpoint's fp32
scales are cast; INT8 scales stay fp32; pre_quant_scale fp16).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from onnx_rewriter.errors import UnsupportedModel
from onnx_rewriter.features import wa_checkpoint, wa_quant
from onnx_rewriter.features.wa_calibrate import CalibratedLinear  # a QuantLinear of known shape (codes lazy)
from onnx_rewriter.modelio.graph import computed_constant, constant_array, lazy_proto, producer
from onnx_rewriter.reference import qdq

FP8, INT8 = "fp8", "int8_sq"
_TYPE_NAMES = {TensorProto.FLOAT8E4M3FN: "FLOAT8E4M3FN", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8"}
_KINDS = {TensorProto.FLOAT8E4M3FN: FP8, TensorProto.INT8: INT8}


# onnxruntime's QOperator and dynamic quantization formats: integer ops the contract has no form for
_ORT_INTEGER = {"QLinearMatMul", "MatMulInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat", "QGemm",
                "DynamicQuantizeMatMul", "QLinearConv", "ConvInteger", "QAttention", "QLinearAdd", "QLinearMul"}


def qdq_nodes(graph) -> list:
    """The quantization nodes of an input graph this module reads or refuses: QuantizeLinear / DequantizeLinear
    other than INT4's blocked weights (features/int4/onnx_in.py converts those: a block_size), onnxruntime's
    integer ops, and any other op whose name says it quantizes (TensorRT's TRT_FP8QuantizeLinear, ...)."""
    return [n for n in graph.nodes if n.op == "QuantizeLinear" or n.op in _ORT_INTEGER
            or (n.op == "DequantizeLinear" and not n.attrs.get("block_size"))
            or ("quantize" in n.op.lower() and n.op not in ("QuantizeLinear", "DequantizeLinear"))]


def _foreign(graph) -> None:
    """The refusal of quantization ops that are no Q/DQ pair: onnxruntime's integer ops, custom Q/DQ ops."""
    for n in graph.nodes:
        if n.op in _ORT_INTEGER:
            _refuse(n, "onnxruntime's QOperator / dynamic quantization format (integer ops), which the contract has "
                       "no form for; quantize with quant_format=QuantFormat.QDQ (static, QInt8, symmetric)")
        if "quantize" in n.op.lower() and n.op not in ("QuantizeLinear", "DequantizeLinear"):
            _refuse(n, f"a {n.domain + '::' if n.domain else ''}{n.op} node, not a standard Q/DQ pair; Q/DQ ONNX input "
                       f"is read for FP8 and INT8-SQ QuantizeLinear / DequantizeLinear only (for ModelOpt's NVFP4 / "
                       f"MXFP8 graphs export the checkpoint instead: `export --model FOLDER`)")


def _refuse(node, why: str):
    raise UnsupportedModel(f"{node.op} '{node.name}': {why} (docs/support.md, 'Already-quantized Q/DQ ONNX')")


def _small(t, node) -> np.ndarray:
    """The values of a scale / zero point: an initializer or a Constant node's."""
    if isinstance(t, gs.Constant):
        return np.asarray(constant_array(t, None))
    p = producer(t)
    if p is not None and p.op == "Constant" and isinstance(p.attrs.get("value"), gs.Constant):
        return np.asarray(p.attrs["value"].values)
    _refuse(node, f"its scale / zero point '{t.name}' is computed in the graph, not a constant")


def _elem_type(t) -> int | None:
    proto = lazy_proto(t) if isinstance(t, gs.Constant) else None
    if proto is not None:
        return proto.data_type
    dt = getattr(t, "dtype", None)
    if dt is None:
        return None
    try:
        return helper.np_dtype_to_tensor_dtype(np.dtype(dt))
    except (TypeError, KeyError, ValueError):
        return None


def _pair_type(node) -> int:
    """The quantized type of a QuantizeLinear (its output_dtype, else its zero point's type, else uint8) or of a
    DequantizeLinear's input."""
    if node.op == "QuantizeLinear":
        if node.attrs.get("output_dtype"):
            return int(node.attrs["output_dtype"])
        zp = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        return _elem_type(zp) if zp is not None else TensorProto.UINT8
    return _elem_type(node.inputs[0])


def _zero_point_zero(node) -> None:
    zp = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if zp is not None and np.any(qdq.decode(_small(zp, node)) != 0):
        _refuse(node, "a non-zero zero point (asymmetric quantization); the contract's FP8 and INT8-SQ have none")


def _form(node, kind_of: str, code: int | None = None) -> str:
    """FP8 or INT8 of a Q or DQ node (`code`: its quantized type when known from its pair), or the refusal
    (type, saturate, block_size, zero point)."""
    if node.domain not in ("", "ai.onnx", None):
        _refuse(node, f"a {node.domain}:: Q/DQ op (NVFP4 / MXFP8 graphs use trt::); Q/DQ ONNX input is read for "
                      f"FP8 and INT8-SQ only: export the ModelOpt checkpoint instead (`export --model FOLDER`)")
    code = _pair_type(node) if code is None else code
    if code == TensorProto.FLOAT4E2M1:
        _refuse(node, "FLOAT4E2M1 (NVFP4) Q/DQ; Q/DQ ONNX input is read for FP8 and INT8-SQ only: export the "
                      "ModelOpt NVFP4 checkpoint instead (`export --model FOLDER`)")
    if node.attrs.get("block_size"):
        _refuse(node, f"block_size {node.attrs['block_size']} on the {kind_of}; the contract's FP8 / INT8-SQ pairs "
                      f"are per tensor (per output channel for INT8 weights), not blocked")
    if code == TensorProto.UINT8:
        _refuse(node, f"uint8 {kind_of} (onnxruntime's asymmetric default); the contract's INT8-SQ quantizes to "
                      f"int8 with no zero point (re-quantize with QuantType.QInt8, symmetric)")
    if code not in _KINDS:
        _refuse(node, f"{_TYPE_NAMES.get(code, f'type {code}')} {kind_of}; only FLOAT8E4M3FN (FP8) and int8 "
                      f"(INT8-SQ) pairs map to the contract's forms")
    if node.op == "QuantizeLinear" and int(node.attrs.get("saturate", 1)) != 1:
        _refuse(node, "saturate=0; the runtime's FP8 conversion saturates")
    _zero_point_zero(node)
    return _KINDS[code]


def _skip_cast(t):
    p = producer(t)
    return p.inputs[0] if p is not None and p.op == "Cast" else t


@dataclass
class _Act:
    x: gs.Tensor  # what the MatMul reads once the chain is gone (before a pre_quant_scale Mul)
    kind: str  # FP8 | INT8
    scale: np.float32  # s_in, as the input holds it
    pqs: np.ndarray | None  # pre_quant_scale [K] (INT8-SQ) or None


def _same_type(a, b) -> bool:
    return a.dtype is None or b.dtype is None or np.dtype(a.dtype) == np.dtype(b.dtype)


def _activation(t, mm, k: int | None) -> _Act | None:
    """The act() chain on a MatMul's input (`k`: the weight's input channels), None where there is none, or the
    refusal. x is the tensor before the chain's Casts where its type is the MatMul's (fp16 x -> Cast fp32 -> Q/DQ
    -> Cast fp16), else the Q's own input."""
    dq = producer(_skip_cast(t))
    if dq is None or dq.op != "DequantizeLinear":
        return None
    if dq.domain not in ("", "ai.onnx", None):
        _form(dq, "activation")  # the refusal naming its domain
    q = producer(dq.inputs[0])
    if q is None or q.op != "QuantizeLinear":
        _refuse(dq, f"on the activation input of MatMul '{mm.name}' without a QuantizeLinear before it")
    kind = _form(q, "activation")
    _form(dq, "activation", _pair_type(q))
    s_q, s_dq = _small(q.inputs[1], q), _small(dq.inputs[1], dq)
    if s_q.size != 1:
        _refuse(q, f"a per-channel activation scale {list(s_q.shape)}; the contract's activation scales are per "
                   f"tensor")
    if s_dq.shape != s_q.shape or not np.array_equal(s_q, s_dq):
        _refuse(dq, f"its scale differs from its QuantizeLinear's ('{q.name}'): not one Q/DQ pair")
    x, pqs = _skip_cast(q.inputs[0]), None
    if not _same_type(x, t):
        x = q.inputs[0]
    mul = producer(x)
    if kind == INT8 and mul is not None and mul.op == "Mul":
        c = mul.inputs[1]
        if isinstance(c, gs.Constant) and len(c.shape) == 1 and k is not None and int(c.shape[0]) == k:
            pqs, x = np.asarray(constant_array(c, None), np.float32), mul.inputs[0]
    return _Act(x, kind, np.float32(s_q.reshape(())), pqs)


@dataclass
class _Weight:
    kind: str  # FP8 | INT8
    n: int
    k: int
    scale: np.ndarray  # s_w: [] or [N], fp32
    codes: object  # () -> the codes [N, K] (E4M3 bytes as uint8, or int8), read at write time
    dtype: np.dtype  # the type of the weight the MatMul read


def _weight(t, mm, base_dir) -> _Weight | None:
    """The wdq() chain on a MatMul's weight input, None where there is none, or the refusal. `codes()` reads the
    codes as [N, K] (uint8 E4M3 bytes or int8) when called (at write time)."""
    node, transposed = producer(t), False
    while node is not None and node.op in ("Transpose", "Cast"):  # either order: DQ -> Cast -> Transpose or back
        if node.op == "Transpose":
            if transposed or list(node.attrs.get("perm", [1, 0])) != [1, 0]:
                return None
            transposed = True
        node = producer(node.inputs[0])
    if node is None or node.op != "DequantizeLinear":
        return None
    if node.attrs.get("block_size") and _pair_type(node) in (TensorProto.INT4, TensorProto.UINT4):
        return None  # INT4's blocked weights: features/int4/onnx_in.py
    src, wq = node.inputs[0], None
    q_src = producer(src) if not isinstance(src, gs.Constant) else None
    kind = _form(node, "weight", _pair_type(q_src) if q_src is not None and q_src.op == "QuantizeLinear" else None)
    if not isinstance(src, gs.Constant):
        wq = producer(src)
        if wq is None or wq.op != "QuantizeLinear" or not isinstance(wq.inputs[0], gs.Constant):
            _refuse(node, f"the weight of MatMul '{mm.name}' is neither a constant nor QuantizeLinear of one")
        if _form(wq, "weight", _pair_type(wq)) != kind:
            _refuse(wq, "its type differs from its DequantizeLinear's")
        if not np.array_equal(_small(wq.inputs[1], wq), _small(node.inputs[1], node)):
            _refuse(node, f"its scale differs from its QuantizeLinear's ('{wq.name}'): not one Q/DQ pair")
    shape = [int(d) for d in (src.shape if wq is None else wq.inputs[0].shape)]
    if len(shape) != 2:
        _refuse(node, f"a weight of rank {len(shape)}; a linear's weight is 2-D")
    n, k = shape if transposed else shape[::-1]
    scale = _small(node.inputs[1], node)
    axis = int(node.attrs.get("axis", 1)) % 2
    n_axis = 0 if transposed else 1
    if scale.size != 1:
        if kind == FP8:
            _refuse(node, f"per-channel FP8 weight scales {list(scale.shape)}; the contract's FP8 is per tensor")
        if scale.ndim != 1 or axis != n_axis or scale.shape[0] != n:
            _refuse(node, f"weight scales {list(scale.shape)} on axis {axis}; INT8-SQ scales one value per output "
                          f"channel (axis {n_axis} of this [{'N, K' if transposed else 'K, N'}] weight)")
    scale_dtype = np.dtype(np.float16 if scale.dtype == np.float16 else np.float32)
    scale = np.asarray(scale, np.float32)

    # what the writer needs later, held now: the build disconnects these nodes
    fake = None if wq is None else (wq.inputs[0], _small(wq.inputs[1], wq), _zp(wq), _pair_type(wq))

    def codes(src=src, fake=fake, transposed=transposed, axis=axis):
        if fake is None:
            c = np.asarray(constant_array(src, base_dir))
        else:  # the graph's own QuantizeLinear of its fp32 weight, evaluated once (what the input computes)
            w = np.asarray(constant_array(fake[0], base_dir), np.float32)
            c = qdq.quantize_linear(w, fake[1], fake[2], axis=axis, output_dtype=fake[3])
        c = c.view(np.uint8) if kind == FP8 else c.astype(np.int8)
        return np.ascontiguousarray(c if transposed else c.T)

    # the weight W' takes the type the MatMul read (a DequantizeLinear's Cast after it included)
    out_dtype = np.dtype(t.dtype) if t.dtype is not None else scale_dtype
    return _Weight(kind, n, k, scale, codes, out_dtype)


def _zp(node):
    zp = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    return None if zp is None else _small(zp, node)


class _LazyTensors(dict):
    """A QuantLinear's tensors: the small ones held, the codes read when the writer asks."""

    def __init__(self, small: dict, codes):
        super().__init__(small)
        self._codes = codes

    def __missing__(self, key):
        if key != "weight":
            raise KeyError(key)
        return self._codes()


def _quant_linear(name: str, act: _Act, w: _Weight) -> CalibratedLinear:
    small = {"input_scale": np.array(act.scale, np.float32)}
    if w.kind == FP8:
        small["weight_scale"] = np.array(w.scale.reshape(()), np.float32)
    else:
        small["weight_scale"] = np.broadcast_to(w.scale.reshape(-1), (w.n,)).astype(np.float32)
        if act.pqs is not None:
            small["pre_quant_scale"] = act.pqs.astype(np.float16)
    return CalibratedLinear(name, w.kind, _LazyTensors(small, w.codes), (w.n, w.k))


def convert(graph: gs.Graph, base_dir) -> dict:
    """Every Q/DQ linear of `graph` -> MatMul(x, W'), in place; returns {W' name: QuantLinear}. Refuses (one line
    naming the node) what it does not understand, and any Q/DQ node left on no linear's input."""
    _foreign(graph)
    out = {}
    for mm in [n for n in graph.nodes if n.op == "MatMul"]:
        w = _weight(mm.inputs[1], mm, base_dir)
        act = _activation(mm.inputs[0], mm, None if w is None else w.k)
        if act is None and w is None:
            continue
        if act is None or w is None:
            what = "weight" if act is None else "activation"
            _refuse(mm, f"only its {what} is quantized; the contract's W+A linears quantize both (a weight-only FP8 "
                        f"/ INT8 linear has no runtime form)")
        if act.kind != w.kind:
            _refuse(mm, f"a {act.kind} activation with a {w.kind} weight; the contract pairs FP8 with FP8 and int8 "
                        f"with int8")
        if act.pqs is not None and act.pqs.size != w.k:
            _refuse(mm, f"pre_quant_scale of {act.pqs.size} channels for a weight of K={w.k}")
        lin = _quant_linear(mm.name, act, w)
        weight = computed_constant(f"{mm.name}/qdq_weight", w.dtype, (w.k, w.n),
                                   lambda lin=lin, dt=w.dtype: lin.effective(np.float64).T.astype(dt))
        out[weight.name] = lin
        mm.inputs[0], mm.inputs[1] = act.x, weight
    if out:
        graph.cleanup().toposort()
    left = qdq_nodes(graph)
    if left:
        node = left[0]
        users = [u for o in node.outputs for u in o.outputs]
        if node.op == "QuantizeLinear" and users and all(u.op == "DequantizeLinear" for u in users):
            users = [u for dq in users for o in dq.outputs for u in o.outputs]  # what the pair feeds
        ops = sorted({u.op for u in users}) or ["nothing"]
        src = producer(node.inputs[0]) if node.inputs else None
        hint = ""
        if src is not None and src.op == "MatMul":  # a linear's output: onnxruntime's quantize_static does that
            hint = (f"; it quantizes the output of MatMul '{src.name}', which the contract never does (onnxruntime's "
                    f"quantize_static: extra_options OpTypesToExcludeOutputQuantization=['MatMul'])")
        _refuse(node, f"not on a linear's input (its pair feeds {', '.join(ops)}){hint}; only the Q/DQ pairs on "
                      f"MatMul linears' inputs map to the contract's W+A forms")
    return out


class OnnxLinears:
    """What `wa_checkpoint.Checkpoint` is to the checkpoint route, from the input graph's Q/DQ linears:
    `linears` {module: scheme} (filled as the emitter finds them) and `linear(module)`."""

    def __init__(self, by_weight: dict):
        self.by_weight = by_weight
        self.linears: dict = {}
        self._lin: dict = {}

    def add(self, module: str, weight_name: str) -> None:
        lin = self.by_weight[weight_name]
        self.linears[module], self._lin[module] = lin.scheme, lin

    def linear(self, module: str) -> wa_checkpoint.QuantLinear:
        return self._lin[module]


_WHAT = {FP8: "FP8 W8A8", INT8: "INT8-SQ W8A8"}


class QdqOnnx(wa_quant.WaQuant):
    """Implied by Q/DQ nodes in the input graph: its FP8 / INT8(-SQ) linears in the contract's form."""

    def __init__(self):
        super().__init__(checkpoint="")
        self.by_weight: dict = {}

    def prepare(self, run) -> None:
        if any(f is not self and f.name in ("int4", "wa_quant") for f in run.features):  # before any calibration
            raise UnsupportedModel(f"--quantize {run.options.quantize}: the input graph is already quantized (it "
                                   f"holds Q/DQ nodes) and would be quantized again; drop --quantize")
        self.by_weight = convert(run.source.graph, run.source.base_dir)

    def check(self, run, target) -> None:
        schemes = sorted({lin.scheme for lin in self.by_weight.values()})
        self.scheme = schemes[0] if len(schemes) == 1 else "mixed"
        for scheme in schemes:
            what = f"Q/DQ ONNX input ({_WHAT[scheme]})"
            plan = wa_quant.plan_for(target, run.options.dtype, scheme, what)
            run.warn(f"{what}: {wa_quant.INT8_NOTE if scheme == INT8 else plan.note}")
        self.plan = plan
        self.set_opset(run, target, set(schemes), "Q/DQ ONNX input")
        self.ck = OnnxLinears(self.by_weight)

    def finder(self, run, lm_head):
        def find(node, w):
            if w.name not in self.by_weight:
                return None
            module = wa_quant.module_of(node.name) if node.name.startswith("/") else w.name
            self.ck.add(module, w.name)
            return module

        return find

    def kept_fp16(self, node, lm_head) -> str:
        return "not quantized in the input graph"

    def apply(self, run, build) -> None:
        super().apply(run, build)
        done = {e["weight"] for e in run.report.features[self.name]["linears"] if e["wa"]}
        lost = sorted(set(self.by_weight) - done)
        if lost:
            raise UnsupportedModel(f"Q/DQ ONNX input: the quantized linear '{self.by_weight[lost[0]].module}' is not "
                                   f"a MatMul with its weight in the built graph ({len(lost)} such)")
        run.report.features[self.name]["source"] = "Q/DQ ONNX input"

