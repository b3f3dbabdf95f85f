"""Per-head q/k RMSNorm (Qwen3, Gemma3): Mul(gamma, RMSNorm core(x)), or one opset-23 RMSNormalization.

The core (Pow/ReduceMean/Add(eps)/Sqrt/Reciprocal|Div/Mul, with Casts) is the `rms_norm` stage's match;
this adds the gamma Mul. Gemma's `x·(1 + w)` arrives with `1 + w` already folded to a constant, so the
constant multiplier is the gamma either way. Every RMSNorm with a 1-D gamma matches here; whether it is
a per-head q/k norm (gamma of head size, directly before RoPE) is decided by `attention_layer`.
"""

from onnx_rewriter.matching import CASTS, QKNorm, check, const, skip, split_const


class QKRMSNorm:
    name = "qk_rmsnorm"
    stage = "qk_norm"
    anchors = ("Mul", "RMSNormalization")

    def match(self, node, ctx):
        if node.op == "RMSNormalization":
            return self._onnx_op(node)
        split = split_const(node)
        check(split is not None, "qk_norm: Mul has no constant operand", node)
        other, gamma = split
        check(gamma.ndim == 1 and gamma.size > 1,
              f"qk_norm: constant operand of shape {list(gamma.shape)} is not a 1-D gamma", node)
        core = ctx.lookup("rms_norm", skip(other, CASTS))
        check(core is not None, f"qk_norm: gamma multiplies something that is not an RMSNorm core "
                                f"({ctx.why_not('rms_norm', skip(other, CASTS))})", node)
        return node.outputs[0], QKNorm(weight=gamma, eps=core.result.eps, x=core.result.x)

    def _onnx_op(self, node):
        check(len(node.inputs) >= 2, "qk_norm: RMSNormalization without scale", node)
        gamma = const(node.inputs[1])
        check(gamma is not None and gamma.ndim == 1, "qk_norm: RMSNormalization scale is not a constant 1-D gamma",
              node)
        x = node.inputs[0]
        rank = len(x.shape) if x.shape is not None else None
        axis = node.attrs.get("axis", -1)
        check(axis == -1 or (rank is not None and axis == rank - 1),
              f"qk_norm: RMSNormalization axis {axis} is not the last", node)
        return node.outputs[0], QKNorm(weight=gamma, eps=float(node.attrs.get("epsilon", 1e-5)), x=skip(x, CASTS))


PATTERN = QKRMSNorm()
