"""Weight+activation quantized linears (contract part 3, section 16): today FP8 W8A8 per tensor, INT8-SmoothQuant,
NVFP4 W4A4, W4A16_NVFP4 (weight-only), MXFP8 and MIXED_PRECISION of those from ModelOpt checkpoints (`export
--model FOLDER`, the formats features/wa_checkpoint.py reads); the calibrated routes from an fp16 model are later
pieces (docs/support.md). One emitter per scheme, `_emit_linear` picks each linear's (MIXED_PRECISION: per layer):
INT8-SQ's form `_emit_int8`; NVFP4's `_emit_nvfp4`; W4A16_NVFP4's `_emit_a16` (Nvfp4A16GemmPlugin on 0.10 / 0.11,
features/nvfp4_a16.py) or `_nvfp4_weight` alone (0.9); MXFP8's `_emit_mxfp8`.
FLOAT4E2M1 weights need opset 23: 0.10 / 0.11 write 24, a 0.9 graph (which keeps the input's, 20) is raised to 23
(`run.min_opset`).

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

Per target (`SCHEME_PLANS`): edgellm-0.5 has none of it (refused by name); 0.9, 0.10 and 0.11 take every scheme.
FP8 GEMMs need SM 89+ (Ada, Hopper, Blackwell): a warning says Jetson Orin (SM 87) cannot build the engine; INT8-SQ
runs there; FP4 is Blackwell only (a warning each).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from onnx.defs import OpSchema

from onnx_rewriter.errors import UnsupportedModel
from onnx_rewriter.features import nvfp4_a16, wa_checkpoint
from onnx_rewriter.features.base import Feature, FeatureOptions, fp16_plan, option, weight_matmuls
from onnx_rewriter.modelio.graph import computed_constant, constant_array, values_of
from onnx_rewriter.targets.base import lm_head_input

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def as_e4m3(codes):
    """uint8 E4M3 codes as float8 values: an array, or blocks of rows (wa_calibrate streams them)."""
    return codes.view(E4M3) if isinstance(codes, np.ndarray) else (b.view(E4M3) for b in codes)
E2M1 = np.dtype(ml_dtypes.float4_e2m1fn)
# what this module emits today; "mixed" (MIXED_PRECISION) is each linear in its own of the others
SCHEMES = ("fp8", "int8_sq", "nvfp4", "w4a16_nvfp4", "mxfp8", "mixed")
FP4_OPSET = 23  # FLOAT4E2M1 initializers and DequantizeLinear on them (onnx opset 23, IR 11)
# Standard ops whose meaning (not only their types) changed between opset 20 and FP4_OPSET: a graph holding one
# is not relabelled (onnx's changelog: 21-23 added int4 / fp4 / bf16 types to the others)
_CHANGED_MEANING = ("GroupNormalization",)


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
INT8_PLANS = {t: Plan(INT8_NOTE) for t in PLANS}
NAMES = {"fp8": "FP8 W8A8 checkpoint", "int8_sq": "INT8-SQ W8A8 checkpoint", "nvfp4": "NVFP4 W4A4 checkpoint",
         "w4a16_nvfp4": "NVFP4 weight-only (W4A16_NVFP4) checkpoint", "mxfp8": "MXFP8 checkpoint"}
# NVFP4 (16.4): FLOAT4E2M1 initializers and DequantizeLinear on them need opset 23; 0.10 / 0.11 write 24, 0.9
# keeps the input's (20 for dynamo exports) and is raised to 23 where FP4 weights are written.
_FP4 = ("FP4 GEMMs are Blackwell-only (SM100/110/120/121: Thor, GB10, RTX 50); Jetson Orin (SM 87) and older "
        "GPUs cannot build this engine")
_RAISED = f"; the graph's opset is raised to {FP4_OPSET} for its FLOAT4E2M1 weights (TensorRT >= 10.8 inferred)"
NVFP4_PLANS = {"edgellm-0.9": Plan(_FP4 + _RAISED), "edgellm-0.10": Plan(_FP4), "edgellm-0.11": Plan(_FP4)}
# W4A16_NVFP4 (16.5 / 16.7): 0.10 / 0.11 run trt_edgellm::Nvfp4A16GemmPlugin (Marlin bytes, fp16 activations);
# 0.9 has no plugin: the 16.4 wdq with no activation Q/DQ feeds fp16 GEMMs (NVIDIA's --no-quantize-activations form).
_A16 = ("weight-only FP4: DequantizeLinear'd FP4 weights feed fp16 GEMMs (NVIDIA's --no-quantize-activations "
        "form: correct, not fast; this runtime has no Nvfp4A16GemmPlugin); TensorRT's FP4 types are a Blackwell "
        "feature (inferred)")
_A16_PLUGIN = ("weight-only FP4 as Nvfp4A16GemmPlugin (Marlin layout, fp16 activations; SM 80 or newer per NVIDIA's "
               "Marlin kernel; whether Jetson Orin, which NVIDIA says runs no FP4 engines, builds it is not known); "
               "the Blackwell variant (--target-sm 110) is not emitted")
A16_PLUGIN_TARGETS = ("edgellm-0.10", "edgellm-0.11")
A16_PLANS = {"edgellm-0.9": Plan(_A16 + _RAISED), **{t: Plan(_A16_PLUGIN) for t in A16_PLUGIN_TARGETS}}
# MXFP8 (16.5): trt:: MX ops, block 32, E8M0 scales, no calibration; "offer on 0.10/0.11 behind a warning", 0.9 warns
# that the engine build fails on Thor with 0.9.x (NVIDIA issue 137)
_MX = ("MXFP8 GEMMs are a Blackwell feature (inferred); the activation's E8M0 scale rule (2^ceil(log2(amax/448)) "
       "per 32 values) is inferred from NVIDIA's recipe, not read from TensorRT")
MXFP8_PLANS = {"edgellm-0.9": Plan(_MX + "; NVIDIA reports MXFP8 engine builds failing on Thor with runtime 0.9.x "
                                         "(TensorRT-Edge-LLM issue 137)"),
               "edgellm-0.10": Plan(_MX), "edgellm-0.11": Plan(_MX)}
SCHEME_PLANS = {"fp8": PLANS, "int8_sq": INT8_PLANS, "nvfp4": NVFP4_PLANS, "w4a16_nvfp4": A16_PLANS,
                "mxfp8": MXFP8_PLANS}
_WARN = {"fp8": "FP8 W8A8", "int8_sq": "INT8-SQ W8A8", "nvfp4": "NVFP4 W4A4", "w4a16_nvfp4": "NVFP4 W4A16",
         "mxfp8": "MXFP8 W8A8"}


def plan_for(target, dtype: str, scheme: str = "fp8", name: str | None = None) -> Plan:
    return fp16_plan(SCHEME_PLANS[scheme], target, dtype, name or NAMES[scheme],
                     "has no weight+activation quantization (contract part 3, 16.1)", "its Q/DQ feed fp16 GEMMs")


def linear_schemes(fmt) -> dict:
    """{scheme: first module} of the linears a checkpoint format quantizes (MIXED_PRECISION: per layer, the
    excluded ones left out; otherwise the format's one scheme)."""
    if fmt.scheme != "mixed":
        return {fmt.scheme: None}
    out: dict = {}
    for module, scheme in sorted(fmt.layers.items()):
        if not fmt.excluded(module):
            out.setdefault(scheme, module)
    return out


def check_target(target, dtype: str, fmt) -> dict:
    """{scheme: Plan} of every scheme the checkpoint holds, or the one-line refusal (UnsupportedModel): a scheme
    not emitted (named with its first linear for MIXED_PRECISION), a target without it, a dtype not fp16."""
    plans = {}
    for scheme, module in linear_schemes(fmt).items():
        if scheme not in SCHEME_PLANS:
            where = f"{module} is " if module else ""
            raise UnsupportedModel(f"{fmt.name}: {where}{wa_checkpoint.SCHEME_NAMES.get(scheme, scheme)}, which "
                                   f"the W+A route does not emit (docs/support.md, 'Quantized checkpoints')")
        name = NAMES[scheme] if fmt.scheme != "mixed" else f"MIXED_PRECISION checkpoint ({_WARN[scheme]} layers)"
        plans[scheme] = plan_for(target, dtype, scheme, name)
    return plans


def weight_key(w) -> str:
    return hashlib.sha1(np.ascontiguousarray(w, dtype=np.float16).tobytes()).hexdigest()


class WaQuant(Feature):
    name = "wa_quant"
    a16_plugin = False  # W4A16_NVFP4 linears as Nvfp4A16GemmPlugin (check: the target has it)

    def __init__(self, checkpoint: str):
        self.checkpoint = checkpoint

    def check(self, run, target) -> None:
        fmt = wa_checkpoint.detect(self.checkpoint)
        if fmt is None or fmt.scheme not in SCHEMES:
            raise UnsupportedModel(f"'{self.checkpoint}': {fmt.name if fmt else 'not a quantized checkpoint'}; "
                                   f"the W+A route reads ModelOpt FP8, INT8-SQ, NVFP4, W4A16_NVFP4, MXFP8 and "
                                   f"MIXED_PRECISION checkpoints only")
        self.scheme = fmt.scheme
        plans = check_target(target, run.options.dtype, fmt)
        self.plan = next(iter(plans.values()))
        for scheme, plan in plans.items():
            run.warn(f"{_WARN[scheme]}: {plan.note}")
        self.ck = wa_checkpoint.Checkpoint(self.checkpoint, fmt)
        self.a16_plugin, self.domain = target.name in A16_PLUGIN_TARGETS, target.domain
        if self.a16_plugin and "w4a16_nvfp4" in plans and any(f.name == "lora" for f in run.features):
            # lora.py binds MatMuls and the INT4 plugins only: these linears would silently get no slot
            raise UnsupportedModel(f"--lora: the {_WARN['w4a16_nvfp4']} linears are Nvfp4A16GemmPlugin on "
                                   f"{target.name}, which --lora attaches no LoRA slot to (not written yet)")
        schemes = set(plans) - ({"w4a16_nvfp4"} if self.a16_plugin else set())  # the plugin holds no FP4 type
        self.set_opset(run, target, schemes, NAMES.get(fmt.scheme, "MIXED_PRECISION checkpoint"))

    def set_opset(self, run, target, schemes, what: str) -> None:
        """The output's opset: the target's (or the input's); raised to FP4_OPSET where FP4 weights need it."""
        self.opset = target.opset or run.source.opset
        if self.opset < FP4_OPSET and {"nvfp4", "w4a16_nvfp4"} & set(schemes):  # edgellm-0.9 keeps the input's
            # relabelled, not converted: refused where an op of the input means something else at FP4_OPSET
            changed = sorted({n.op for n in run.source.graph.nodes if n.op in _CHANGED_MEANING and not n.domain})
            if changed:
                raise UnsupportedModel(f"{what}: FLOAT4E2M1 weights need opset {FP4_OPSET} and target "
                                       f"{target.name} keeps the input's ({self.opset}), where {changed[0]} means "
                                       f"something else; use edgellm-0.10 or edgellm-0.11")
            self.opset = run.min_opset = max(run.min_opset, FP4_OPSET)

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
            entries.append({**entry, "wa": lin.scheme, "linear": module,
                            **self._emit_linear(g, node, module, lin, chains)})
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
                                   lambda: as_e4m3(ck.linear(module).tensors["weight"]))
        wd = gs.Variable(f"{base}/weight_dequantized", np.float16)
        wt = gs.Variable(f"{base}/weight_transposed", np.float16)
        g.nodes.append(gs.Node("DequantizeLinear", name=f"{base}/weight_quantizer/DequantizeLinear",
                               inputs=[weight, gs.Constant(f"{base}/weight_scale", np.array(s_w, np.float16))],
                               outputs=[wd]))
        g.nodes.append(gs.Node("Transpose", name=f"{base}/weight_quantizer/Transpose", inputs=[wd], outputs=[wt],
                               attrs={"perm": [1, 0]}))
        node.inputs[0], node.inputs[1] = chains[key], wt

    def _emit_linear(self, g, node, module, lin, chains) -> dict:
        """One linear in its own scheme (`lin.scheme`); returns what the report says of it."""
        t = lin.tensors
        if lin.scheme == "int8_sq":
            s_in = np.float32(t["input_scale"].reshape(()))
            self._emit_int8(g, node, module, lin, s_in, chains)
            return {"input_scale": float(s_in), "pre_quant_scale": "pre_quant_scale" in t}
        if lin.scheme == "nvfp4":
            s_in, s_g = np.float32(t["input_scale"].reshape(())), np.float32(t["weight_scale_2"].reshape(-1)[0])
            self._emit_nvfp4(g, node, module, lin, s_in, s_g, chains)
            return {"input_scale": float(s_in), "weight_scale_2": float(s_g)}
        if lin.scheme == "w4a16_nvfp4":
            s_g = np.float32(t["weight_scale_2"].reshape(-1)[0])
            if self.a16_plugin:
                return {"weight_scale_2": float(s_g), **self._emit_a16(g, node, module, lin, s_g)}
            node.inputs[1] = self._nvfp4_weight(g, node.name.removesuffix("/MatMul"), module, lin, s_g)
            return {"weight_scale_2": float(s_g)}
        if lin.scheme == "mxfp8":
            self._emit_mxfp8(g, node, module, lin, chains)
            return {}
        if lin.scheme == "fp8":
            s_in = np.float16(lin.tensors["input_scale"].reshape(()))
            s_w = np.float16(lin.tensors["weight_scale"].reshape(()))
            self._emit(g, node, module, lin, s_in, s_w, chains)
            return {"input_scale": float(s_in), "weight_scale": float(s_w)}
        raise UnsupportedModel(f"{module}: {wa_checkpoint.SCHEME_NAMES.get(lin.scheme, lin.scheme)} is not emitted")

    def _emit_a16(self, g, node, module, lin, s_g) -> dict:
        """Contract part 3 16.5: Nvfp4A16GemmPlugin(x fp16 [.., K], qweights, block_scales, global_scale; gemm_n=N_p,
        gemm_k=K, max_m=0) -> fp16 [.., N_p], Sliced back to N where N_p (N rounded up to 128) is larger. The
        checkpoint's codes and E4M3 bytes repacked (features/nvfp4_a16.py); refused by name where the plugin
        cannot hold the linear exactly."""
        n, k = lin.shape
        why = nvfp4_a16.refusal(module, n, k, s_g)
        if why:
            raise UnsupportedModel(f"{NAMES['w4a16_nvfp4']}: {why}")
        base, n_p, ck = node.name.removesuffix("/MatMul"), nvfp4_a16.padded(n), self.ck
        cache: dict = {}

        def part(i):  # the three inputs come from one read of the linear
            if not cache:
                t = ck.linear(module).tensors
                cache.update(enumerate(nvfp4_a16.pack(t["weight"], t["weight_scale"], t["weight_scale_2"])))
            return cache.pop(i)

        qweights = computed_constant(f"{base}/qweights", np.int8, (1, k // 16, 8 * n_p), lambda: part(0))
        scales = computed_constant(f"{base}/block_scales", np.int8, (1, k // 16, n_p), lambda: part(1))
        glob = gs.Constant(f"{base}/global_scale", nvfp4_a16.global_scale(s_g))
        x, out = node.inputs[0], node.outputs[0]
        y = out if n_p == n else gs.Variable(f"{base}/{nvfp4_a16.OP}_out", np.float16)
        g.nodes.append(gs.Node(nvfp4_a16.OP, name=f"{base}/{nvfp4_a16.OP}", domain=self.domain,
                               inputs=[x, qweights, scales, glob], outputs=[y],
                               attrs={"gemm_n": n_p, "gemm_k": k, "max_m": 0}))
        if n_p != n:  # zero rows past N: the plugin's N_p columns Sliced back
            consts = [gs.Constant(f"{base}/{nvfp4_a16.OP}_{a}", np.array([v], np.int64))
                      for a, v in (("starts", 0), ("ends", n), ("axes", -1))]
            g.nodes.append(gs.Node("Slice", name=f"{base}/{nvfp4_a16.OP}_slice", inputs=[y, *consts], outputs=[out]))
        out.dtype = np.float16
        node.inputs.clear()
        node.outputs.clear()
        return {"plugin": nvfp4_a16.OP, "gemm_n": n_p}

    def schemas(self) -> list:
        ints = {a: OpSchema.AttrType.INT for a in ("gemm_n", "gemm_k", "max_m")}
        return [(nvfp4_a16.OP, ["activation", "qweights", "block_scales", "global_scale"], ["output"], ints)]

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
        node.inputs[0], node.inputs[1] = chains[key], self._nvfp4_weight(g, base, module, lin, s_g)

    def _emit_mxfp8(self, g, node, module, lin, chains) -> None:
        """Contract part 3 16.5: act(x) = trt::TRT_MXFP8DequantizeLinear(trt::TRT_MXFP8DynamicQuantize(x)) (the
        quantizer's two outputs, E4M3 values and E8M0 scales, both read by the dequantizer), block 32 on the last
        axis, fp16 out; the weight FLOAT8E4M3FN [N, K] and its E8M0 scales uint8 [N, K/32] (checkpoint bytes)
        through trt::TRT_MXFP8DequantizeLinear to fp16, Transposed."""
        base = node.name.removesuffix("/MatMul")
        x = node.inputs[0]
        mx = {"axis": -1, "block_size": 32}
        key = ("mxfp8", x.name)
        if key not in chains:
            xq = gs.Variable(f"{base}/input_quantizer/TRT_MXFP8DynamicQuantize_out", E4M3)
            sx = gs.Variable(f"{base}/input_quantizer/TRT_MXFP8DynamicQuantize_scale", np.uint8)
            g.nodes.append(gs.Node("TRT_MXFP8DynamicQuantize", name=f"{base}/input_quantizer/TRT_MXFP8DynamicQuantize",
                                   domain="trt", inputs=[x], outputs=[xq, sx], attrs={**mx, "output_dtype": 17}))
            chains[key] = _var(g, "TRT_MXFP8DequantizeLinear", f"{base}/input_quantizer/TRT_MXFP8DequantizeLinear",
                               [xq, sx], np.float16, {**mx, "output_dtype": 10}, domain="trt")
        n, k = lin.shape
        ck = self.ck
        weight = computed_constant(f"{base}/weight", E4M3, (n, k),
                                   lambda: as_e4m3(ck.linear(module).tensors["weight"]))
        scale = computed_constant(f"{base}/weight_scale", np.uint8, (n, k // 32),
                                  lambda: ck.linear(module).tensors["weight_scale"])
        wd = _var(g, "TRT_MXFP8DequantizeLinear", f"{base}/weight_quantizer/TRT_MXFP8DequantizeLinear",
                  [weight, scale], np.float16, {**mx, "output_dtype": 10}, domain="trt")
        wt = _var(g, "Transpose", f"{base}/weight_quantizer/Transpose", [wd], np.float16, {"perm": [1, 0]})
        node.inputs[0], node.inputs[1] = chains[key], wt

    def _nvfp4_weight(self, g, base, module, lin, s_g) -> gs.Variable:
        """16.4's wdq: the FP4 weight [N, K] (checkpoint bytes) dequantized with DequantizeLinear(s_blk, s_g) as
        its blocked scale, Cast to fp16, Transposed to [K, N] (NVFP4, and W4A16_NVFP4 without the act())."""
        n, k = lin.shape
        ck = self.ck
        weight = computed_constant(f"{base}/weight", E2M1, (n, k), lambda: ck.linear(module).tensors["weight"])
        s_blk = computed_constant(f"{base}/weight_scale", E4M3, (n, k // 16),
                                  lambda: as_e4m3(ck.linear(module).tensors["weight_scale"]))
        s_g = gs.Constant(f"{base}/weight_scale_2", np.array(s_g, np.float32))
        blk = _var(g, "DequantizeLinear", f"{base}/weight_quantizer/DequantizeLinear_scale", [s_blk, s_g],
                   np.float32)
        wd = _var(g, "DequantizeLinear", f"{base}/weight_quantizer/DequantizeLinear", [weight, blk], np.float32,
                  {"axis": -1, "block_size": 16})
        wd = _var(g, "Cast", f"{base}/weight_quantizer/Cast", [wd], np.float16, {"to": 10})
        return _var(g, "Transpose", f"{base}/weight_quantizer/Transpose", [wd], np.float16, {"perm": [1, 0]})


def _var(g, op: str, name: str, inputs, dtype, attrs=None, domain: str | None = None) -> gs.Variable:
    out = gs.Variable(f"{name}_out", dtype)
    g.nodes.append(gs.Node(op, name=name, inputs=inputs, outputs=[out], attrs=attrs or {}, domain=domain))
    return out


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

    scheme: str  # "fp8" | "int8_sq" | "nvfp4" | "mxfp8" | "w4a16_nvfp4" (weight-only: no activation quantizer)
    input_scale: np.ndarray | None  # scalar: fp16 (FP8) or fp32 (INT8-SQ, NVFP4); None: MXFP8, weight-only
    pre_quant_scale: np.ndarray | None  # fp16 [K] (INT8-SQ) or None
    matmul: str  # the MatMul node's name (W4A16_NVFP4 on 0.10 / 0.11: the Nvfp4A16GemmPlugin's)


def wa_linears(model, base_dir=None) -> dict:
    """{module path: WaLinear} of every W+A linear of a written graph: a MatMul reading [Cast] DequantizeLinear
    (QuantizeLinear(x', s)) (NVFP4: trt::DequantizeLinear(trt::TRT_FP4DynamicQuantize(x, s), ...)),
    x' = [Cast]([Mul](x, pre_quant_scale)) (node names are path-style: /model/layers.0/self_attn/q_proj/MatMul);
    the scheme is its weight's type (FLOAT8E4M3FN, INT8, FLOAT4E2M1). A FLOAT4E2M1 weight read by a MatMul whose
    input is not quantized is W4A16_NVFP4's weight-only linear, and so is an Nvfp4A16GemmPlugin (`matmul` then
    names the plugin node: /model/layers.0/mlp/up_proj/Nvfp4A16GemmPlugin). `base_dir`: the folder, for scales a
    graph loaded without its external data keeps there (pre_quant_scale is, in --external-data folders)."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}

    def value(name):
        t = inits[name]
        if t.data_location == TensorProto.EXTERNAL and base_dir is None:
            raise ValueError(f"wa_linears: '{name}' is in the folder's external data; pass the folder")
        return np.array(values_of(t, Path(base_dir or ".")))
    producer = {o: n for n in model.graph.node for o in n.output}

    def up(name, op):
        node = producer.get(name)
        return node if node is not None and node.op_type == op else None

    def skip_cast(name):
        cast = up(name, "Cast")
        return cast.input[0] if cast is not None else name

    out = {}
    for n in model.graph.node:
        if n.op_type == nvfp4_a16.OP and n.name.endswith(f"/{nvfp4_a16.OP}"):
            out[module_of(n.name.removesuffix(f"/{nvfp4_a16.OP}"))] = WaLinear("w4a16_nvfp4", None, None, n.name)
            continue
        if n.op_type != "MatMul" or not n.name.endswith("/MatMul"):
            continue
        dq = up(skip_cast(n.input[0]), "DequantizeLinear") or up(n.input[0], "TRT_MXFP8DequantizeLinear")
        q = None if dq is None else (up(dq.input[0], "QuantizeLinear") or up(dq.input[0], "TRT_FP4DynamicQuantize")
                                     or up(dq.input[0], "TRT_MXFP8DynamicQuantize"))
        transpose = up(n.input[1], "Transpose")
        wdq = None if transpose is None else (up(skip_cast(transpose.input[0]), "DequantizeLinear")
                                              or up(transpose.input[0], "TRT_MXFP8DequantizeLinear"))
        if wdq is None or wdq.input[0] not in inits:
            continue
        if wdq.op_type == "TRT_MXFP8DequantizeLinear":  # MXFP8: dynamic E8M0 scales, no input scale
            if q is not None and q.op_type == "TRT_MXFP8DynamicQuantize":
                out[module_of(n.name)] = WaLinear("mxfp8", None, None, n.name)
            continue
        elem = inits[wdq.input[0]].data_type
        if q is None:
            if elem == TensorProto.FLOAT4E2M1:
                out[module_of(n.name)] = WaLinear("w4a16_nvfp4", None, None, n.name)
            continue
        scheme = {TensorProto.FLOAT8E4M3FN: "fp8", TensorProto.INT8: "int8_sq",
                  TensorProto.FLOAT4E2M1: "nvfp4"}.get(elem)
        if scheme is None or len(q.input) < 2 or q.input[1] not in inits:  # no form of ours (e.g. an MX act())
            continue
        mul = up(skip_cast(q.input[0]), "Mul")
        pqs = None
        if mul is not None and mul.input[1] in inits:
            pqs = value(mul.input[1])
        out[module_of(n.name)] = WaLinear(scheme, value(q.input[1]), pqs, n.name)
    return out


def module_of(node_name: str) -> str:
    """The HF module a path-style linear node name names (/model/layers.0/mlp/up_proj/MatMul:
    model.layers.0.mlp.up_proj)."""
    return node_name.removeprefix("/").removesuffix("/MatMul").replace("/", ".")
