"""Weight+activation quantized linears (contract part 3, section 16): today FP8 W8A8 per tensor, INT8-SmoothQuant
and NVFP4 W4A4 from ModelOpt checkpoints (`export --model FOLDER`, the formats features/wa_checkpoint.py reads); the
calibrated routes from an fp16 model are later pieces (docs/support.md). INT8-SQ's form: `_emit_int8`; NVFP4's:
`_emit_nvfp4` (FLOAT4E2M1 weights need opset 23: 0.10 and 0.11 only here, 0.9 is refused by name).

Every decoder linear the checkpoint quantized, `MatMul(x, W[K, N])` in the traced graph (its weight is the
checkpoint's dequantized value, so its fp16 bytes identify the linear, like INT4 checkpoints), becomes, for FP8
(section 16.2 / 16.3)

    xq = QuantizeLinear(x, s_in)          FLOAT8E4M3FN, s_in fp16 [] = fp16(input_scale)
    xd = DequantizeLinear(xq, s_in)       fp16
    wd = DequantizeLinear(W, s_w)         W FLOAT8E4M3FN [N, K] (checkpoint bytes), s_w fp16 [] = fp16(weight_scale)
    y  = MatMul(xd, Transpose(wd, perm=[1, 0]))

The QuantizeLinear says FLOAT8E4M3FN with `output_dtype=17` where the graph's opset is >= 21 (0.10, 0.11),
with an FLOAT8E4M3FN zero-point 0 below (0.9 keeps its input's opset, 20 for dynamo exports): the same op.
Linears reading one input with one scale share one act() chain (q/k/v, gate/up). q/k/v stay three MatMuls.
lm_head stays fp16 unless the checkpoint quantized it (ModelOpt excludes it by default).

Per target (`PLANS`): edgellm-0.5 has none of it (refused by name); 0.9, 0.10 and 0.11 take both. FP8 GEMMs need
SM 89+ (Ada, Hopper, Blackwell): a warning says Jetson Orin (SM 87) cannot build the engine; INT8-SQ runs there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from onnx_rewriter.errors import UnsupportedModel
from onnx_rewriter.features import wa_checkpoint
from onnx_rewriter.features.base import Feature, FeatureOptions, fp16_plan, option, weight_matmuls
from onnx_rewriter.modelio.graph import computed_constant, constant_array
from onnx_rewriter.targets.base import lm_head_input

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E2M1 = np.dtype(ml_dtypes.float4_e2m1fn)
SCHEMES = ("fp8", "int8_sq", "nvfp4")  # what this module emits today


@dataclass(frozen=True)
class Plan:
    note: str  # the warning every export to this target gets


_SM = ("FP8 W8A8 GEMMs need SM 89 or newer (Ada, Hopper, Blackwell); Jetson Orin (SM 87) cannot build this "
       "engine: use INT4 or INT8-SQ there")
PLANS = {
    "edgellm-0.9": Plan(_SM + "; FP8 Q/DQ patterns are those of NVIDIA's 0.8+ exporter (0.6/0.7 inferred)"),
    "edgellm-0.10": Plan(_SM),
    "edgellm-0.11": Plan(_SM),
}
INT8_NOTE = "INT8-SQ runs on every GPU the runtime supports, Jetson Orin included"
NAMES = {"fp8": "FP8 W8A8 checkpoint", "int8_sq": "INT8-SQ W8A8 checkpoint", "nvfp4": "NVFP4 W4A4 checkpoint"}
# NVFP4 (16.4): FLOAT4E2M1 initializers and DequantizeLinear on them need opset 23; 0.10 / 0.11 write 24, 0.9
# keeps the input's (20 for dynamo exports), so 0.9 is refused here although the contract allows it there.
_FP4 = ("FP4 GEMMs are Blackwell-only (SM100/110/120/121: Thor, GB10, RTX 50); Jetson Orin (SM 87) and older "
        "GPUs cannot build this engine")
NVFP4_PLANS = {"edgellm-0.10": Plan(_FP4), "edgellm-0.11": Plan(_FP4)}


def plan_for(target, dtype: str, scheme: str = "fp8") -> Plan:
    if scheme == "nvfp4":
        lacks = ("has no weight+activation quantization (contract part 3, 16.1)" if target.name not in PLANS else
                 "keeps the input's opset, and FLOAT4E2M1 weights need opset 23: not emitted there yet (use "
                 "edgellm-0.10 or edgellm-0.11)")
        return fp16_plan(NVFP4_PLANS, target, dtype, NAMES[scheme], lacks, "its Q/DQ feed fp16 GEMMs")
    return fp16_plan(PLANS, target, dtype, NAMES[scheme],
                     "has no weight+activation quantization (contract part 3, 16.1)", "its Q/DQ feed fp16 GEMMs")


def weight_key(w) -> str:
    return hashlib.sha1(np.ascontiguousarray(w, dtype=np.float16).tobytes()).hexdigest()


class WaQuant(Feature):
    name = "wa_quant"

    def __init__(self, checkpoint: str):
        self.checkpoint = checkpoint

    def check(self, run, target) -> None:
        fmt = wa_checkpoint.detect(self.checkpoint)
        if fmt is None or fmt.scheme not in SCHEMES:
            raise UnsupportedModel(f"'{self.checkpoint}': {fmt.name if fmt else 'not a quantized checkpoint'}; "
                                   f"the W+A route reads ModelOpt FP8, INT8-SQ and NVFP4 checkpoints only")
        self.scheme = fmt.scheme
        self.plan = plan_for(target, run.options.dtype, fmt.scheme)
        run.warn({"fp8": f"FP8 W8A8: {self.plan.note}", "int8_sq": f"INT8-SQ W8A8: {INT8_NOTE}",
                  "nvfp4": f"NVFP4 W4A4: {self.plan.note}"}[fmt.scheme])
        self.ck = wa_checkpoint.Checkpoint(self.checkpoint, fmt)
        self.opset = target.opset or run.source.opset

    def apply(self, run, build) -> None:
        g = build.graph
        lm_head, _ = lm_head_input(build.logits)
        find = self.finder(run, lm_head)
        chains: dict = {}
        entries = []
        for node, w, k, n in weight_matmuls(g):
            entry = {"node": node.name, "weight": w.name, "K": k, "N": n}
            module = find(node, w)
            if module is None:
                entries.append({**entry, "wa": None, "reason": self.kept_fp16(node, lm_head)})
                continue
            lin = self.ck.linear(module)
            if lin.scheme == "int8_sq":
                s_in = np.float32(lin.tensors["input_scale"].reshape(()))
                self._emit_int8(g, node, module, lin, s_in, chains)
                entries.append({**entry, "wa": "int8_sq", "linear": module, "input_scale": float(s_in),
                                "pre_quant_scale": "pre_quant_scale" in lin.tensors})
                continue
            if lin.scheme == "nvfp4":
                s_in = np.float32(lin.tensors["input_scale"].reshape(()))
                s_g = np.float32(lin.tensors["weight_scale_2"].reshape(-1)[0])
                self._emit_nvfp4(g, node, module, lin, s_in, s_g, chains)
                entries.append({**entry, "wa": "nvfp4", "linear": module, "input_scale": float(s_in),
                                "weight_scale_2": float(s_g)})
                continue
            s_in = np.float16(lin.tensors["input_scale"].reshape(()))
            s_w = np.float16(lin.tensors["weight_scale"].reshape(()))
            self._emit(g, node, module, lin, s_in, s_w, chains)
            entries.append({**entry, "wa": "fp8", "linear": module, "input_scale": float(s_in),
                            "weight_scale": float(s_w)})
        done = [e for e in entries if e["wa"]]
        missing = sorted(set(self.ck.linears) - {e["linear"] for e in done})
        if missing:
            raise UnsupportedModel(f"{NAMES[self.scheme]}: {len(missing)} quantized linear(s) are not in the "
                                   f"graph as a MatMul with their weight (first: {missing[0]})")
        run.report.features[self.name] = {"scheme": self.scheme, "linears": entries, "act_chains": len(chains)}

    def finder(self, run, lm_head):
        """(node, weight) -> the module of `self.ck.linears` a MatMul computes, or None. From a checkpoint: the
        traced weight is the checkpoint's dequantized value, so its fp16 bytes identify it (features/wa_calibrate.py
        has its own: the calibrated linears of an fp16 model)."""
        by_value = {weight_key(self.ck.linear(m).traced_weight().T): m for m in self.ck.linears}
        return lambda node, w: by_value.get(weight_key(np.asarray(constant_array(w, run.source.base_dir))))

    def kept_fp16(self, node, lm_head) -> str:
        return "lm_head stays fp16" if node is lm_head else "not quantized in the checkpoint"

    def _emit(self, g, node, module, lin, s_in, s_w, chains) -> None:
        base = node.name.removesuffix("/MatMul")
        x = node.inputs[0]
        key = (x.name, float(s_in))
        if key not in chains:
            scale = gs.Constant(f"{base}/input_scale", np.array(s_in, np.float16))
            q_in, attrs = [x, scale], {"output_dtype": 17}
            if self.opset < 21:  # QuantizeLinear-19/20: the zero point's type is the output's
                q_in, attrs = [x, scale, gs.Constant(f"{base}/input_zero_point", np.zeros((), E4M3))], {}
            xq = gs.Variable(f"{base}/input_quantized", E4M3)
            xd = gs.Variable(f"{base}/input_dequantized", np.float16)
            g.nodes.append(gs.Node("QuantizeLinear", name=f"{base}/input_quantizer/QuantizeLinear", inputs=q_in,
                                   outputs=[xq], attrs=attrs))
            g.nodes.append(gs.Node("DequantizeLinear", name=f"{base}/input_quantizer/DequantizeLinear",
                                   inputs=[xq, scale], outputs=[xd]))
            chains[key] = xd
        n, k = lin.shape
        ck = self.ck
        weight = computed_constant(f"{base}/weight", E4M3, (n, k),
                                   lambda: ck.linear(module).tensors["weight"].view(E4M3))
        wd = gs.Variable(f"{base}/weight_dequantized", np.float16)
        wt = gs.Variable(f"{base}/weight_transposed", np.float16)
        g.nodes.append(gs.Node("DequantizeLinear", name=f"{base}/weight_quantizer/DequantizeLinear",
                               inputs=[weight, gs.Constant(f"{base}/weight_scale", np.array(s_w, np.float16))],
                               outputs=[wd]))
        g.nodes.append(gs.Node("Transpose", name=f"{base}/weight_quantizer/Transpose", inputs=[wd], outputs=[wt],
                               attrs={"perm": [1, 0]}))
        node.inputs[0], node.inputs[1] = chains[key], wt

    def _emit_int8(self, g, node, module, lin, s_in, chains) -> None:
        """Contract part 3 16.5: Mul(x, pre_quant_scale), int8 Q/DQ with an fp32 scale, Cast to fp16; the weight
        int8 [N, K] with per-row fp32 scales (axis 0), Cast to fp16, Transpose. Below opset 23 QuantizeLinear
        wants x and its scale in one type: the Mul's output is cast to fp32 first (the same numbers)."""
        base = node.name.removesuffix("/MatMul")
        x = node.inputs[0]
        pqs = lin.tensors.get("pre_quant_scale")
        pqs = None if pqs is None else np.asarray(pqs, np.float16).reshape(-1)
        key = ("int8", x.name, None if pqs is None else pqs.tobytes(), float(s_in))
        if key not in chains:
            xs = x
            if pqs is not None:
                xs = _var(g, "Mul", f"{base}/smooth/Mul", [x, gs.Constant(f"{base}/pre_quant_scale", pqs)],
                          np.float16)
            if self.opset < 23:
                xs = _var(g, "Cast", f"{base}/input_quantizer/Cast_fp32", [xs], np.float32, {"to": 1})
            scale = gs.Constant(f"{base}/input_scale", np.array(s_in, np.float32))
            q_in, attrs = [xs, scale], {"output_dtype": 3}
            if self.opset < 21:  # QuantizeLinear-19/20: the zero point's type is the output's
                q_in, attrs = [xs, scale, gs.Constant(f"{base}/input_zero_point", np.zeros((), np.int8))], {}
            xq = _var(g, "QuantizeLinear", f"{base}/input_quantizer/QuantizeLinear", q_in, np.int8, attrs)
            xd = _var(g, "DequantizeLinear", f"{base}/input_quantizer/DequantizeLinear", [xq, scale], np.float32)
            chains[key] = _var(g, "Cast", f"{base}/input_quantizer/Cast", [xd], np.float16, {"to": 10})
        n, k = lin.shape
        ck = self.ck
        weight = computed_constant(f"{base}/weight", np.int8, (n, k), lambda: ck.linear(module).tensors["weight"])
        s_w = gs.Constant(f"{base}/weight_scale", np.asarray(lin.tensors["weight_scale"], np.float32).reshape(-1))
        wd = _var(g, "DequantizeLinear", f"{base}/weight_quantizer/DequantizeLinear", [weight, s_w], np.float32,
                  {"axis": 0})
        wd = _var(g, "Cast", f"{base}/weight_quantizer/Cast", [wd], np.float16, {"to": 10})
        wt = _var(g, "Transpose", f"{base}/weight_quantizer/Transpose", [wd], np.float16, {"perm": [1, 0]})
        node.inputs[0], node.inputs[1] = chains[key], wt

    def _emit_nvfp4(self, g, node, module, lin, s_in, s_g, chains) -> None:
        """Contract part 3 16.4: act(x) = trt::DequantizeLinear(x_f4, trt::DequantizeLinear(sx, Cast(s_in, fp16));
        axis=-1, block_size=16) of trt::TRT_FP4DynamicQuantize(x, s_in fp32 []); the weight FLOAT4E2M1 [N, K]
        (the checkpoint's packed bytes verbatim) with DequantizeLinear(s_blk E4M3 [N, K/16], s_g fp32 []) as
        its blocked scale, Cast to fp16, Transpose."""
        base = node.name.removesuffix("/MatMul")
        x = node.inputs[0]
        key = ("nvfp4", x.name, float(s_in))
        if key not in chains:
            scale = gs.Constant(f"{base}/input_scale", np.array(s_in, np.float32))
            xq = gs.Variable(f"{base}/input_quantizer/TRT_FP4DynamicQuantize_out", E2M1)
            sx = gs.Variable(f"{base}/input_quantizer/TRT_FP4DynamicQuantize_scale", E4M3)
            g.nodes.append(gs.Node("TRT_FP4DynamicQuantize", name=f"{base}/input_quantizer/TRT_FP4DynamicQuantize",
                                   domain="trt", inputs=[x, scale], outputs=[xq, sx],
                                   attrs={"axis": -1, "block_size": 16, "scale_type": 17}))
            s16 = _var(g, "Cast", f"{base}/input_quantizer/Cast_scale", [scale], np.float16, {"to": 10})
            d = _var(g, "DequantizeLinear", f"{base}/input_quantizer/DequantizeLinear_scale", [sx, s16],
                     np.float16, domain="trt")
            chains[key] = _var(g, "DequantizeLinear", f"{base}/input_quantizer/DequantizeLinear", [xq, d],
                               np.float16, {"axis": -1, "block_size": 16}, domain="trt")
        n, k = lin.shape
        ck = self.ck
        weight = computed_constant(f"{base}/weight", E2M1, (n, k), lambda: ck.linear(module).tensors["weight"])
        s_blk = computed_constant(f"{base}/weight_scale", E4M3, (n, k // 16),
                                  lambda: ck.linear(module).tensors["weight_scale"].view(E4M3))
        s_g = gs.Constant(f"{base}/weight_scale_2", np.array(s_g, np.float32))
        blk = _var(g, "DequantizeLinear", f"{base}/weight_quantizer/DequantizeLinear_scale", [s_blk, s_g],
                   np.float32)
        wd = _var(g, "DequantizeLinear", f"{base}/weight_quantizer/DequantizeLinear", [weight, blk], np.float32,
                  {"axis": -1, "block_size": 16})
        wd = _var(g, "Cast", f"{base}/weight_quantizer/Cast", [wd], np.float16, {"to": 10})
        wt = _var(g, "Transpose", f"{base}/weight_quantizer/Transpose", [wd], np.float16, {"perm": [1, 0]})
        node.inputs[0], node.inputs[1] = chains[key], wt


def _var(g, op: str, name: str, inputs, dtype, attrs=None, domain: str | None = None) -> gs.Variable:
    out = gs.Variable(f"{name}_out", dtype)
    g.nodes.append(gs.Node(op, name=name, inputs=inputs, outputs=[out], attrs=attrs or {}, domain=domain))
    return out


def input_qdq(graph) -> list:
    """QuantizeLinear / DequantizeLinear nodes of an input graph other than INT4's blocked weights (a block_size:
    features/int4/onnx_in.py converts those)."""
    return [n for n in graph.nodes if n.op == "QuantizeLinear"
            or (n.op == "DequantizeLinear" and not n.attrs.get("block_size"))]


class QdqInput(Feature):
    """Implied by an input graph that already holds Q/DQ nodes (an FP8 / INT8 quantized export): they are kept
    as they are, never folded into fp16 weights; a target without W+A quantization (edgellm-0.5) refuses them,
    the others warn that the pairs are not checked against the contract."""

    name = "qdq_input"

    def check(self, run, target) -> None:
        nodes = input_qdq(run.source.graph)
        if not nodes:
            return
        if target.name not in PLANS:
            raise UnsupportedModel(f"the input graph holds {len(nodes)} QuantizeLinear/DequantizeLinear nodes "
                                   f"(first: '{nodes[0].name}'): target {target.name} has no weight+activation "
                                   f"quantization (contract part 3, 16.1)")
        run.warn(f"the input graph holds {len(nodes)} QuantizeLinear/DequantizeLinear nodes (first: "
                 f"'{nodes[0].name}'): kept as they are, not checked against the contract's Q/DQ forms; for a "
                 f"ModelOpt FP8 checkpoint use `export --model FOLDER` (docs/contract.md)")


@dataclass
class WaQuantOptions(FeatureOptions):
    # A ModelOpt FP8 checkpoint folder whose codes and scales the graph takes (set by `export`; no flag)
    wa_checkpoint: str | None = option(None, None, "")

    def enabled(self) -> bool:
        return bool(self.wa_checkpoint)

    def validate(self, target, options) -> None:
        if self.wa_checkpoint:
            plan_for(target, options.dtype)

    def feature(self, options) -> WaQuant:
        return WaQuant(self.wa_checkpoint)


# ---------------------------------------------------------------------- verify: the same numbers in transformers


@dataclass(frozen=True)
class WaLinear:
    """One W+A linear as a written graph holds it (read back by verify)."""

    scheme: str  # "fp8" | "int8_sq" | "nvfp4"
    input_scale: np.ndarray  # scalar: fp16 (FP8) or fp32 (INT8-SQ, NVFP4)
    pre_quant_scale: np.ndarray | None  # fp16 [K] (INT8-SQ) or None
    matmul: str  # the MatMul node's name


def wa_linears(model) -> dict:
    """{module path: WaLinear} of every W+A linear of a written graph: a MatMul reading [Cast] DequantizeLinear
    (QuantizeLinear(x', s)) (NVFP4: trt::DequantizeLinear(trt::TRT_FP4DynamicQuantize(x, s), ...)),
    x' = [Cast]([Mul](x, pre_quant_scale)) (node names are path-style: /model/layers.0/self_attn/q_proj/MatMul);
    the scheme is its weight's type (FLOAT8E4M3FN, INT8, FLOAT4E2M1)."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def up(name, op):
        node = producer.get(name)
        return node if node is not None and node.op_type == op else None

    def skip_cast(name):
        cast = up(name, "Cast")
        return cast.input[0] if cast is not None else name

    out = {}
    for n in model.graph.node:
        if n.op_type != "MatMul" or not n.name.endswith("/MatMul"):
            continue
        dq = up(skip_cast(n.input[0]), "DequantizeLinear")
        q = None if dq is None else (up(dq.input[0], "QuantizeLinear") or up(dq.input[0], "TRT_FP4DynamicQuantize"))
        transpose = up(n.input[1], "Transpose")
        wdq = up(skip_cast(transpose.input[0]), "DequantizeLinear") if transpose is not None else None
        if q is None or wdq is None or wdq.input[0] not in inits:
            continue
        elem = inits[wdq.input[0]].data_type
        scheme = {TensorProto.FLOAT8E4M3FN: "fp8", TensorProto.INT8: "int8_sq",
                  TensorProto.FLOAT4E2M1: "nvfp4"}.get(elem)
        if scheme is None:
            continue
        mul = up(skip_cast(q.input[0]), "Mul")
        pqs = None
        if mul is not None and mul.input[1] in inits:
            pqs = numpy_helper.to_array(inits[mul.input[1]])
        out[module_of(n.name)] = WaLinear(scheme, numpy_helper.to_array(inits[q.input[1]]), pqs, n.name)
    return out


def module_of(node_name: str) -> str:
    """The HF module a path-style linear node name names (/model/layers.0/mlp/up_proj/MatMul:
    model.layers.0.mlp.up_proj)."""
    return node_name.removeprefix("/").removesuffix("/MatMul").replace("/", ".")
