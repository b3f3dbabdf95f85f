"""The attention core: MatMul(softmax(MatMul(q, k^T) * scale + mask), v), with q, k, v in [B, H, S, D].

Covers the sdpa decomposition (scale split as sqrt(s) on q and on k^T, IsNaN/Where guard after
Softmax) and eager attention (one scale Mul on the scores, additive mask, Casts around Softmax).
Soft-capping (Tanh on the scores, Gemma 2) is refused: the plugin cannot soft-cap.
"""

from onnx_rewriter.matching import (
    CASTS,
    AttentionCore,
    Refuse,
    Reject,
    check,
    const,
    expect,
    peel_scale,
    producer,
    skip,
)


def _guarded_consumer(prob):
    """Follow Softmax's output through an IsNaN/Where guard and Casts to the P·V MatMul."""
    t = prob
    for _ in range(4):
        users = t.outputs
        mm = [n for n in users if n.op == "MatMul" and n.inputs[0] is t]
        if mm:
            return mm[0]
        where = [n for n in users if n.op == "Where" and n.inputs[2] is t]
        casts = [n for n in users if n.op == "Cast"]
        if where:
            w = where[0]
            isnan = producer(w.inputs[0])
            check(isnan is not None and isnan.op == "IsNaN" and isnan.inputs[0] is t,
                  "attention: Where after Softmax is not a NaN guard", w)
            check(const(w.inputs[1]) is not None and float(abs(const(w.inputs[1])).max()) == 0.0,
                  "attention: NaN guard does not write 0", w)
            t = w.outputs[0]
        elif len(casts) == 1 and len(users) == 1:
            t = casts[0].outputs[0]
        else:
            break
    raise Reject("attention: Softmax output does not reach a MatMul with v", users[0] if users else None)


class AttentionCorePattern:
    name = "attention_core"
    stage = "attention_core"
    anchors = ("Softmax",)

    def match(self, node, ctx):
        axis = node.attrs.get("axis", -1)
        check(axis in (-1, 3), f"attention: Softmax axis is {axis}, not the last", node)
        scores = skip(node.inputs[0], CASTS)
        mask = None
        add = producer(scores)
        if add is not None and add.op == "Add":
            a, b = add.inputs
            # the score side is the one that leads to a MatMul through scalar scales
            side = lambda t: producer(peel_scale(t)[0])
            if side(a) is not None and side(a).op in ("MatMul", "Tanh"):
                scores, mask = a, b
            elif side(b) is not None and side(b).op in ("MatMul", "Tanh"):
                scores, mask = b, a
            else:
                raise Reject("attention: Softmax input is an Add but neither side is q·k^T", add)
        inner, s_out = peel_scale(scores)
        if producer(inner) is not None and producer(inner).op == "Tanh":
            raise Refuse("attention logit soft-capping (Tanh on the scores, e.g. Gemma 2) cannot be expressed by the "
                         "AttentionPlugin", producer(inner))
        qk = expect(inner, "MatMul", "attention scores", node)
        q, s_q = peel_scale(qk.inputs[0])
        kt, s_k = peel_scale(qk.inputs[1])
        km = ctx.lookup("k_transpose", kt)
        check(km is not None, f"attention: k side of the scores is not k^T ({ctx.why_not('k_transpose', kt)})", qk)
        pv = _guarded_consumer(node.outputs[0])
        v = pv.inputs[1]
        core = AttentionCore(q=q, k=km.result.k, v=v, out=pv.outputs[0], scale=s_out * s_q * s_k, mask=mask)
        return pv.outputs[0], core


PATTERN = AttentionCorePattern()
