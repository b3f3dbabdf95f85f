"""`--moe-dense`: a routed MoE block written without any MoE plugin (contract part 3 §15.6's plugin-free fallback:
every expert computed, weighted by a scattered top-k mask; docs/contract.md, "Mixture-of-Experts decoders").

For FP16 experts no plugin takes (Qwen2-MoE's E = 60, Mixtral's E = 8, any E on a runtime without Fp16MoePlugin),
in plain ONNX ops that TensorRT runs (MatMul, Softmax, TopK, ScatterElements, Split, Sigmoid):

    p = Softmax(Cast(router_logits, FLOAT)); v, i = TopK(p, k); [v = v / ReduceSum(v)]   renormalized models only
    w = ScatterElements(p * 0, i, v, axis=1)                    [T, E] fp32: the top-k weights, 0 elsewhere
    a = Reshape(MatMul(x, W1), [-1, E, 2I]); gate, up = Split(a)  W1 [H, E·2I]: expert e's [gate; up] rows
    y = MatMul(Reshape(silu(gate) · up · Cast(w, FLOAT16)[.., None], [-1, E·I]), W2)    W2 [E·I, H]

Weighting before the down projection is exact up to rounding (the down GEMM is linear). The cost is the point of
the option's name: E/k times the expert FLOPs of a plugin, and every expert's weights read at every step
(`cost`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_rewriter.modelio.graph import computed_constant, constant_array


def cost(b) -> dict:
    """Per token and routed layer: expert FLOPs and the expert bytes a decode step reads, plugin vs dense (fp16)."""
    per_expert_flops = 2 * 3 * b.hidden * b.inter  # gate, up, down GEMMs, a multiply-add each
    per_expert_bytes = 2 * 3 * b.hidden * b.inter
    return {"plugin_mflop_per_token": round(b.top_k * per_expert_flops / 1e6, 3),
            "dense_mflop_per_token": round(b.experts * per_expert_flops / 1e6, 3),
            "plugin_decode_mb_read": round(b.top_k * per_expert_bytes / 2**20, 3),
            "dense_decode_mb_read": round(b.experts * per_expert_bytes / 2**20, 3),
            "factor": round(b.experts / b.top_k, 2)}


def emit(g: gs.Graph, prefix: str, b, x16, base_dir) -> gs.Variable:
    """The dense form of block `b` reading fp16 tokens x16 [T, H]; returns its output [T, H] fp16."""
    e, i, h, k = b.experts, b.inter, b.hidden, b.top_k
    nodes = []

    def op(kind, name, inputs, dtype, attrs=None, outputs=1):
        outs = [gs.Variable(f"{prefix}/dense_{name}_out{j or ''}", dtype, None) for j in range(outputs)]
        nodes.append(gs.Node(kind, f"{prefix}/dense_{name}", attrs=attrs or {}, inputs=inputs, outputs=outs))
        return outs if outputs > 1 else outs[0]

    def const(name, value):
        return gs.Constant(f"{prefix}/dense_{name}", np.asarray(value))

    def w1():  # [H, E·2I]: column e·2I + j = row j of expert e's [gate; up]
        return np.ascontiguousarray(constant_array(b.gate_up, base_dir).astype(np.float16).reshape(e * 2 * i, h).T)

    def w2():  # [E·I, H]: row e·I + j = column j of expert e's down [H, I]
        return np.ascontiguousarray(constant_array(b.down, base_dir).astype(np.float16).transpose(0, 2, 1)
                                    .reshape(e * i, h))

    logits = op("Cast", "router_cast", [b.router_logits], np.float32, {"to": onnx.TensorProto.FLOAT})
    p = op("Softmax", "softmax", [logits], np.float32, {"axis": -1})
    vals, idx = op("TopK", "topk", [p, const("k", np.array([k], np.int64))], None, {"axis": -1}, outputs=2)
    vals.dtype, idx.dtype = np.float32, np.int64
    if b.renormalize:
        total = op("ReduceSum", "topk_sum", [vals, const("axes", np.array([-1], np.int64))], np.float32,
                   {"keepdims": 1})
        vals = op("Div", "renormalize", [vals, total], np.float32)
    zeros = op("Mul", "zeros", [p, const("zero", np.array(0.0, np.float32))], np.float32)
    weights = op("ScatterElements", "weights", [zeros, idx, vals], np.float32, {"axis": 1})
    w16 = op("Cast", "weights_cast", [weights], np.float16, {"to": onnx.TensorProto.FLOAT16})
    w3 = op("Reshape", "weights_3d", [w16, const("w_shape", np.array([-1, e, 1], np.int64))], np.float16)
    fc1 = op("MatMul", "fc1", [x16, computed_constant(f"{prefix}.dense_fc1", np.float16, (h, e * 2 * i), w1)],
             np.float16)
    a = op("Reshape", "fc1_3d", [fc1, const("fc1_shape", np.array([-1, e, 2 * i], np.int64))], np.float16)
    gate, up = op("Split", "split", [a, const("split", np.array([i, i], np.int64))], np.float16, {"axis": -1},
                  outputs=2)
    gate.dtype = up.dtype = np.float16
    silu = op("Mul", "silu", [gate, op("Sigmoid", "sigmoid", [gate], np.float16)], np.float16)
    m = op("Mul", "weighted", [op("Mul", "swiglu", [silu, up], np.float16), w3], np.float16)
    flat = op("Reshape", "flat", [m, const("flat_shape", np.array([-1, e * i], np.int64))], np.float16)
    out = op("MatMul", "fc2", [flat, computed_constant(f"{prefix}.dense_fc2", np.float16, (e * i, h), w2)],
             np.float16)
    g.nodes.extend(nodes)
    return out
