"""RMSNorm core: Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))), the weight Mul excluded.

Not fused: the match tells the dtype pass where to keep fp32 (x² overflows fp16 beyond |x| ≈ 256,
and real models' residual streams go there), exactly as HF computes RMSNorm in fp32.
"""

from onnx_rewriter.matching import CASTS, RMSNormCore, check, const, scalar, skip


def _only_user(t, ops):
    users = [n for n in t.outputs]
    return users[0] if len(users) == 1 and users[0].op in ops else None


class RMSNorm:
    name = "rms_norm"
    stage = "rms_norm"
    anchors = ("Pow",)

    def match(self, node, ctx):
        check(scalar(node.inputs[1]) == 2.0, "rms_norm: Pow exponent is not 2", node)
        x = skip(node.inputs[0], CASTS)
        mean = _only_user(node.outputs[0], ("ReduceMean",))
        check(mean is not None, "rms_norm: x² is not only reduced by ReduceMean", node)
        axes = const(mean.inputs[1]) if len(mean.inputs) > 1 else mean.attrs.get("axes")
        axes = None if axes is None else [int(a) for a in (axes.reshape(-1) if hasattr(axes, "reshape") else axes)]
        check(axes in ([-1], [2]),
              "rms_norm: ReduceMean is not over the last axis", mean)
        add = _only_user(mean.outputs[0], ("Add",))
        check(add is not None, "rms_norm: no + eps", mean)
        eps = scalar(add.inputs[1]) if scalar(add.inputs[1]) is not None else scalar(add.inputs[0])
        check(eps is not None, "rms_norm: eps is not a constant", add)
        sqrt = _only_user(add.outputs[0], ("Sqrt",))
        check(sqrt is not None, "rms_norm: no Sqrt", add)
        rec = _only_user(sqrt.outputs[0], ("Reciprocal", "Div"))
        check(rec is not None, "rms_norm: no Reciprocal", sqrt)
        if rec.op == "Div":
            check(scalar(rec.inputs[0]) == 1.0 and rec.inputs[1] is sqrt.outputs[0], "rms_norm: Div is not 1/sqrt", rec)
        muls = [n for n in rec.outputs[0].outputs if n.op == "Mul"]
        check(len(muls) == 1 and len(rec.outputs[0].outputs) == 1, "rms_norm: rsqrt has other users", rec)
        mul = muls[0]
        other = mul.inputs[0] if mul.inputs[1] is rec.outputs[0] else mul.inputs[1]
        check(skip(other, CASTS) is x, "rms_norm: rsqrt multiplies another tensor than x", mul)
        return mul.outputs[0], RMSNormCore(x=x, out=mul.outputs[0], eps=eps, nodes=[node, mean, add, sqrt, rec, mul])


PATTERN = RMSNorm()
