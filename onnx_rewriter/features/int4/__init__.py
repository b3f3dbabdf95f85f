"""INT4 weight-only linears: each decoder MatMul with a constant [K, N] weight becomes EdgeLLM's groupwise
INT4 GEMM plugin (G = 128), its weight packed in the target's layout (features/int4/layout.py).

Per target (`PLANS`): which plugin layouts the runtime has, the N divisibility its kernels need, and how
q/k/v reach the attention plugin. A linear that breaks a constraint stays FP16 and the report says why;
lm_head and the embedding (a Gather) always stay FP16. A bias stays the graph's own fp16 Add after the
plugin, as NVIDIA emits it.

Weights are rounded to fp16 (the FP16 model) and quantized while the writer streams them
(graph.computed_constant), RTN a block of whole groups at a time (int4_layout.rtn_packed): the peak does not
grow with the largest weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx.defs import OpSchema

from onnx_rewriter.analysis.moe import routers
from onnx_rewriter.errors import RewriteError, UnsupportedModel
from onnx_rewriter.features.base import Feature, FeatureOptions, check_choice, fp16_plan, option, weight_matmuls
from onnx_rewriter.features.calibration import linear_inputs
from onnx_rewriter.features.int4 import awq as int4_awq
from onnx_rewriter.features.int4 import layout as int4_layout
from onnx_rewriter.features.int4.checkpoint import Checkpoint
from onnx_rewriter.features.int4.onnx_in import convert
from onnx_rewriter.modelio.graph import computed_constant, constant_array, constant_row_blocks
from onnx_rewriter.targets.base import lm_head_input

G = int4_layout.GROUP
OPS = {1: "Int4GroupwiseGemmPlugin", 2: "Int4GroupwiseGemmPluginV2"}


@dataclass(frozen=True)
class Plan:
    """What INT4 looks like on one target."""

    versions: tuple[int, ...]  # plugin layouts the runtime has; the first is the default
    n_multiple: dict  # per version: N must be a multiple of this
    qkv: str  # how q/k/v enter attention: as the target wires them, or through QkvConcatPlugin


PLANS = {
    # 0.4-0.6 runtimes launch the GEMM on an n/128 grid with no fallback: N % 128 (0.9 covers 0.6.x too).
    "edgellm-0.5": Plan((1,), {1: 128}, "target"),
    "edgellm-0.9": Plan((1,), {1: 128}, "target"),
    # 0.10: V1 and V2, V2 by default; q/k/v reach the plugin through the target's plain Concat (contract 3
    # §17.5). N: V2's repacker needs N % 64; V1 keeps 0.9's N % 128 grid (inference: no N rule for 0.10's V1).
    "edgellm-0.10": Plan((2, 1), {1: 128, 2: 64}, "target"),
    # 0.11: GEMV handles N % 8 for V1; V2's repacker needs N % 64. INT4 q/k/v go through QkvConcatPlugin.
    "edgellm-0.11": Plan((2, 1), {1: 8, 2: 64}, "QkvConcatPlugin"),
}


def plan_for(target, dtype: str, plugin_version: int | None) -> tuple[Plan, int]:
    """The target's INT4 plan and plugin layout, or a refusal (no INT4 plugin, not fp16, no such layout)."""
    plan = fp16_plan(PLANS, target, dtype, "--quantize int4", "has no INT4 GEMM plugin",
                     "the INT4 plugin takes and returns fp16 only")
    version = plugin_version or plan.versions[0]
    if version not in plan.versions:
        raise UnsupportedModel(f"--int4-plugin-version {version}: {target.name} has only "
                               f"{', '.join(OPS[v] for v in plan.versions)}")
    return plan, version


def _rank(t) -> int | None:
    return len(t.shape) if getattr(t, "shape", None) is not None else None


class Int4(Feature):
    name = "int4"

    def __init__(self, method: str = "rtn", plugin_version: int | None = None, checkpoint: str | None = None,
                 calibration: str | None = None):
        # "rtn"; "awq": activation-aware scales searched on calibration activations (features/int4/awq.py);
        # "checkpoint": the codes of an AWQ/GPTQ checkpoint; "onnx": those of MatMulNBits / blocked DQ
        self.method = method
        self.plugin_version = plugin_version
        self.checkpoint = checkpoint
        self.calibration = calibration
        self.activations: dict = {}

    # ------------------------------------------------------------------ hooks

    def prepare(self, run) -> None:
        self.onnx_codes = convert(run.source.graph, run.source.base_dir)
        if self.onnx_codes:
            self.method = "onnx"

    def check(self, run, target) -> None:
        self.plan, self.version = plan_for(target, run.options.dtype, self.plugin_version)
        if self.plugin_version is not None and len(self.plan.versions) == 1:  # said, not silently ignored
            run.warn(f"--int4-plugin-version {self.version}: {target.name} has one INT4 layout "
                     f"({OPS[self.version]}), so the option changes nothing there (it chooses between layouts "
                     f"on edgellm-0.10 and 0.11)")
        if self.method == "awq":
            self.activations = linear_inputs(run, self.calibration)

    def apply(self, run, build) -> None:
        g = build.graph
        lm_head, _ = lm_head_input(build.logits)
        domain = _domain(g)
        entries = []
        source = self._source(run)
        for node, w, k, n in weight_matmuls(g):
            entry = {"node": node.name, "weight": w.name, "K": k, "N": n}
            reason = "lm_head stays FP16" if node is lm_head else self._breaks(node, k, n)
            prefix = None
            if reason is None and source is not None:
                prefix = source.find(w)
                reason = None if prefix else f"not quantized in the {'checkpoint' if self.checkpoint else 'input ONNX'}"
            if reason:
                entries.append({**entry, "int4": False, "reason": reason})
                continue
            if prefix:
                extra = self._replace_from_codes(g, node, source, prefix, k, n, domain)
                entries.append({**entry, "int4": True, "op": OPS[self.version], "linear": prefix, **extra})
                continue
            entries.append({**entry, "int4": True, "op": OPS[self.version]})
            self._replace(g, node, w, k, n, domain, run.source.base_dir, entries[-1])
        packed = sum(e["int4"] for e in entries)
        if packed and self.plan.qkv == "QkvConcatPlugin":
            _qkv_concat_plugins(g, domain)
        run.report.features[self.name] = {"method": self.method, "plugin": OPS[self.version], "group_size": G,
                                          "linears": entries}
        body = [e for e in entries if e.get("reason") != "lm_head stays FP16"]
        kept = [e for e in body if not e["int4"]]
        if kept:
            run.warn(f"--quantize int4: {len(kept)} of {len(body)} linears stay FP16 (first: "
                     f"{kept[0]['node']}: {kept[0]['reason']}); the report lists each")
        if not packed and not routers(g):  # an MoE model's experts are INT4 all the same (features/moe)
            raise UnsupportedModel(f"--quantize int4: no linear can be INT4 on this target "
                                   f"({entries[0]['reason'] if entries else 'no MatMul with a constant weight'})")

    def schemas(self) -> list:
        ints = {a: OpSchema.AttrType.INT for a in ("gemm_n", "gemm_k", "group_size")}
        out = [(op, ["input", "qweight", "scales"], ["output"], ints) for op in OPS.values()]
        return out + [("QkvConcatPlugin", ["q", "k", "v"], ["qkv"], {})]

    # ------------------------------------------------------------------ pieces

    def _source(self, run):
        """Where the codes come from: None (RTN), the checkpoint, or the input ONNX's MatMulNBits."""
        if self.checkpoint:
            return _CheckpointCodes(self.checkpoint, run.source.base_dir)
        if getattr(self, "onnx_codes", None):
            return _OnnxCodes(self.onnx_codes, run.source.base_dir)
        return None

    def _breaks(self, node, k: int, n: int) -> str | None:
        """Why this linear cannot be INT4 on the target (contract: leave it FP16), or None."""
        if k % G:
            return f"K={k} is not a multiple of the group size {G}"
        m = self.plan.n_multiple[self.version]
        if n % m:
            return f"N={n} is not a multiple of {m} ({OPS[self.version]})"
        rank = _rank(node.inputs[0])
        if rank is not None and rank != 3:
            return f"input has rank {rank}; the plugin takes [d0, d1, K]"
        return None

    def _replace(self, g: gs.Graph, node: gs.Node, w: gs.Constant, k: int, n: int, domain: str, base_dir,
                 entry: dict) -> None:
        stats = self.activations.get(w.name)
        if stats is None:
            if self.method == "awq":
                entry["awq"] = "no calibration activations (its input is not a baseline tensor): RTN"
            # read and quantized a block of whole groups at a time: the peak does not follow the largest weight
            blocks = lambda: constant_row_blocks(w, base_dir, int4_layout.block_rows(n))  # noqa: E731
            self._emit(g, node, node.inputs[0], node.outputs[0], k, n, domain,
                       lambda: int4_layout.rtn_packed(blocks(), k, n, self.version))
            return

        def codes():  # searched when the writer reaches the weight; the report entry gets the outcome
            wk = constant_array(w, base_dir).astype(np.float16)
            s, alpha, rtn_err, err = int4_awq.search(wk, *stats)
            entry.update(awq_alpha=alpha, rtn_output_error=rtn_err, awq_output_error=err)
            return (*int4_awq.quantize_packed(wk, s, self.version), (1.0 / s).astype(np.float16))

        self._emit(g, node, node.inputs[0], node.outputs[0], k, n, domain, codes, pre_quant_scale=True)

    def _emit(self, g: gs.Graph, node: gs.Node, x, out, k: int, n: int, domain: str, codes,
              pre_quant_scale: bool = False) -> None:
        """The plugin node reading x; `codes()` -> (qweight packed, scales[, pre_quant_scale [K]]), called when
        the writer needs them. With a pre_quant_scale the plugin reads Mul(x, pre_quant_scale) (section 7.9)."""
        rows = int4_layout.packed_shape(n, k, self.version)
        cache: dict = {}

        def part(i):  # qweight, scales (and the pre_quant_scale) come from one read of the weight
            if not cache:
                cache.update(enumerate(codes()))
            return cache.pop(i)

        # `/model/layers.0/mlp/down_proj/Int4GroupwiseGemmPlugin`: the module path names it (contract §13.5)
        base = node.name.removesuffix("/MatMul")
        if pre_quant_scale:
            pqs = computed_constant(f"{base}/pre_quant_scale", np.float16, (k,), lambda: part(2))
            x = _op(g, "Mul", f"{base}/pre_quant_scale_mul", [x, pqs])
        qweight = computed_constant(f"{base}/qweight", np.int8, rows, lambda: part(0))
        scales = computed_constant(f"{base}/scales", np.float16, (k // G, n), lambda: part(1))
        out.dtype = np.float16
        plugin = gs.Node(OPS[self.version], name=f"{base}/{OPS[self.version]}", domain=domain,
                         inputs=[x, qweight, scales], outputs=[out],
                         attrs={"gemm_n": n, "gemm_k": k, "group_size": G})
        node.outputs.clear()
        node.inputs.clear()
        g.nodes.append(plugin)

    def _replace_from_codes(self, g, node, source, prefix: str, k: int, n: int, domain: str) -> dict:
        """The input's own codes (checkpoint or ONNX): Gather(x, perm) first for act-order; where a nibble would
        clip, U = q and the zero-point term is added after the plugin: y += groupsum(x) @ C
        (quantized_checkpoint.py)."""
        lin = source.linear(prefix)
        _, corr, perm = lin.plugin()
        x, out = node.inputs[0], node.outputs[0]
        name = node.name
        pqs = getattr(lin, "pre_quant_scale", None)  # ModelOpt AWQ: Mul(x, pre_quant_scale) first (section 7.9)
        if pqs is not None:
            x = _op(g, "Mul", f"{name}/pre_quant_scale_mul", [x, gs.Constant(f"{name}/pre_quant_scale", pqs)])
        if perm is not None:
            x = _op(g, "Gather", f"{name}/act_order", [x, gs.Constant(f"{name}/perm", perm.astype(np.int64))],
                    {"axis": -1})
        plugin_out = out
        if corr is not None:
            plugin_out = gs.Variable(f"{name}/int4_out", np.float16)
        self._emit(g, node, x, plugin_out, k, n, domain,
                   lambda: (lambda c: (int4_layout.PACKERS[self.version][0](c.plugin()[0]), c.scales))(
                       source.linear(prefix)))
        if corr is not None:
            grouped = _op(g, "Reshape", f"{name}/groups", [x, gs.Constant(f"{name}/group_shape",
                                                                          np.array([0, 0, k // G, G], np.int64))])
            sums = _op(g, "ReduceSum", f"{name}/group_sums", [grouped, gs.Constant(f"{name}/axes",
                                                                                   np.array([-1], np.int64))],
                       {"keepdims": 0})
            term = _op(g, "MatMul", f"{name}/zero_point", [sums, gs.Constant(f"{name}/zero_point_c", corr)])
            g.nodes.append(gs.Node("Add", name=f"{name}/zero_point_add", inputs=[plugin_out, term], outputs=[out]))
        return {"act_order": perm is not None, "zero_point_correction": corr is not None,
                "pre_quant_scale": pqs is not None}


def _op(g: gs.Graph, op: str, name: str, inputs, attrs=None) -> gs.Variable:
    out = gs.Variable(f"{name}_out", np.float16)
    g.nodes.append(gs.Node(op, name=name, inputs=inputs, outputs=[out], attrs=attrs or {}))
    return out


class _CheckpointCodes:
    """Finds the checkpoint linear a traced weight came from: the traced weight is its dequantized value,
    so the fp16 bytes identify it (a weight the checkpoint did not quantize is found nowhere)."""

    def __init__(self, folder, base_dir):
        import hashlib

        self.ck, self.base_dir = Checkpoint(folder), base_dir
        self._hash = lambda a: hashlib.sha1(np.ascontiguousarray(a, dtype=np.float16).tobytes()).hexdigest()
        self.by_value = {self._hash(self.ck.linear(p).dequantized()): p for p in self.ck.prefixes}
        self.linear = self.ck.linear

    def find(self, w: gs.Constant) -> str | None:
        return self.by_value.get(self._hash(np.asarray(constant_array(w, self.base_dir)).astype(np.float16)))


class _OnnxCodes:
    """The codes `quantized_onnx.convert` kept (MatMulNBits, blocked DequantizeLinear), by the name of the
    weight that replaced them."""

    def __init__(self, codes: dict, base_dir):
        self.codes, self.base_dir = codes, base_dir

    def find(self, w: gs.Constant) -> str | None:
        return w.name if w.name in self.codes else None

    def linear(self, key: str):
        return self.codes[key]()


def _domain(g: gs.Graph) -> str:
    """The domain the target wrote its AttentionPlugin in (NVIDIA writes the GEMM plugin in the same one)."""
    return next(n.domain for n in g.nodes if n.op == "AttentionPlugin")


def _qkv_concat_plugins(g: gs.Graph, domain: str) -> None:
    """0.11: the packed qkv Concat in front of each AttentionPlugin becomes QkvConcatPlugin (NVIDIA: a plain
    Concat of INT4 outputs can be elided on SM >= 100 and corrupt the strided V write)."""
    for attn in [n for n in g.nodes if n.op == "AttentionPlugin"]:
        squeeze = attn.inputs[0].inputs[0] if attn.inputs[0].inputs else None
        concat = squeeze.inputs[0].inputs[0] if squeeze is not None and squeeze.inputs[0].inputs else None
        if squeeze is None or squeeze.op != "Squeeze" or concat is None or concat.op != "Concat" \
                or len(concat.inputs) != 3:
            raise UnsupportedModel(f"--quantize int4: cannot find the packed q/k/v Concat of '{attn.name}'")
        concat.op, concat.domain, concat.attrs = "QkvConcatPlugin", domain, {}
        concat.outputs[0].dtype = np.float16


@dataclass
class Int4Options(FeatureOptions):
    # one --quantize for every scheme: fp8 / nvfp4 / int8-sq select features/wa_calibrate.py (its own options)
    quantize: str | None = option(None, "--quantize", "int4: INT4 weight-only linears (groupwise RTN, G=128); fp8, "
                                  "nvfp4, int8-sq: weight+activation Q/DQ, calibrated (--calibration)",
                                  choices=["int4", "fp8", "nvfp4", "int8-sq"])
    int4_plugin_version: int | None = option(None, "--int4-plugin-version", "INT4 plugin layout on edgellm-0.10 / 0.11 "
                                             "(default 2, Int4GroupwiseGemmPluginV2)", type=int, choices=[1, 2])
    int4_method: str = option("rtn", "--int4-method", "awq: activation-aware per-channel scales searched on the "
                              "calibration prompts (a pre_quant_scale Mul per linear)", choices=["rtn", "awq"])
    # An AWQ/GPTQ checkpoint folder whose codes the INT4 plugins take (set by `export`; no flag)
    int4_checkpoint: str | None = None

    def enabled(self) -> bool:
        return self.quantize == "int4"

    def validate(self, target, options) -> None:
        check_choice(self.int4_method, "--int4-method", ("rtn", "awq"))
        if self.int4_method != "rtn" and self.quantize != "int4":
            raise RewriteError(f"--int4-method {self.int4_method} needs --quantize int4")
        if self.quantize:
            check_choice(self.quantize, "--quantize", ("int4", "fp8", "nvfp4", "int8-sq"), UnsupportedModel)
        if self.int4_plugin_version is not None:
            check_choice(self.int4_plugin_version, "--int4-plugin-version", tuple(OPS))
        if self.quantize == "int4":
            plan_for(target, options.dtype, self.int4_plugin_version)  # the target's refusals, before any work

    def feature(self, options) -> Int4:
        method = "checkpoint" if self.int4_checkpoint else self.int4_method
        return Int4(method, self.int4_plugin_version, self.int4_checkpoint, options.calibration)


# ---------------------------------------------------------------------- verify: the same numbers in transformers


def int4_nodes(model) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(node name, scales [K/G, N], pre_quant_scale [K] or None) of every INT4 GEMM node."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type not in OPS.values():
            continue
        mul = producer.get(n.input[0])
        pqs = None
        if mul is not None and mul.op_type == "Mul" and mul.name.endswith("/pre_quant_scale_mul"):
            pqs = numpy_helper.to_array(inits[mul.input[1]])
        out.append((n.name, numpy_helper.to_array(inits[n.input[2]]), pqs))
    return out


def load_dequantized(hf_model, nodes) -> list[tuple[str, str]]:
    """Put the RTN-dequantized weight into each transformers Linear an INT4 node holds; returns (node, linear).

    Computed from the model's own weights, never from the packed bytes, so a packing bug fails verify. A node
    is paired with the Linear whose RTN scales equal the node's scales exactly (scales are stored unpacked).
    With a pre_quant_scale p (activation-aware INT4) the node holds RTN(diag(1/p) W) and reads x * p; p is a
    power of two, so the Linear gets exactly dequant(RTN(W / p)) * p.
    """
    import torch

    linears = {name: m for name, m in hf_model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized: dict = {}
    pairs = []
    for node, scales, pqs in nodes:
        n, k = scales.shape[1], scales.shape[0] * G
        s = None if pqs is None else (1.0 / pqs.astype(np.float32)).astype(np.float32)
        same = []
        for name, m in linears.items():
            if tuple(m.weight.shape) != (n, k):
                continue
            key = (name, None if s is None else s.tobytes())
            if key not in quantized:
                w = m.weight.detach().float().numpy().T.astype(np.float16)
                # the scales alone identify the linear; codes only for the match (all of them: 1.3 GB at 1.5B)
                quantized[key] = int4_layout.group_scales(w if s is None else int4_awq.scaled(w, s))
            if np.array_equal(quantized[key], scales):
                same.append(key)
        if len(same) != 1:
            raise UnsupportedModel(f"verify: INT4 node '{node}' matches {len(same)} linears of the model by its "
                                   f"scales (expected 1); was the folder made from this model?")
        w = linears[same[0][0]].weight.detach().float().numpy().T.astype(np.float16)
        u, sc = int4_layout.rtn(w) if s is None else int4_awq.quantize(w, s)
        w = int4_layout.dequantize(u, sc).astype(np.float32)  # [N, K]
        if pqs is not None:
            w = w * pqs.astype(np.float32)[None, :]
        with torch.no_grad():
            linears[same[0][0]].weight.copy_(torch.from_numpy(w))
        pairs.append((node, same[0][0]))
    return pairs
