"""A vision block's attention on [T, H, D]: Transpose(MatMul(softmax(q' k'^T * s + mask), v'), (1, 0, 2)).

q' = Transpose(q, (1, 0, 2)) and v' likewise; k'^T = Transpose(k, (1, 2, 0)) or the two Transposes it
folds from. q and k must both be rotated by one `vit_rope` table (the plugin has no RoPE: it stays in
the graph before it). s is the product of every scalar factor on the scores, on q' and k'^T, or on the
roped q and k before the transposes (an sdpa export splits it as sqrt(s) on each). The mask is kept as a
tensor: the vision rewrite probes it numerically against cu_seqlens before anything is fused.
"""

from onnx_rewriter.matching import (
    CASTS,
    Reject,
    VitAttention,
    check,
    expect,
    peel_scale,
    producer,
    skip,
    static_dim,
)


def _perm(node, perm, what):
    check(node.op == "Transpose" and list(node.attrs.get("perm", [])) == perm,
          f"vit attention: {what} is not Transpose{tuple(perm)}", node)
    return node.inputs[0]


def _k_of(kt, at):
    """k from k'^T: Transpose(k, (1, 2, 0)) or Transpose(Transpose(k, (1, 0, 2)), (0, 2, 1))."""
    node = expect(kt, "Transpose", "vit attention: k side of the scores", at)
    if list(node.attrs.get("perm", [])) == [1, 2, 0]:
        return node.inputs[0]
    _perm(node, [0, 2, 1], "k^T")
    inner = producer(node.inputs[0])
    check(inner is not None, "vit attention: k^T is not a Transpose of k'", node)
    return _perm(inner, [1, 0, 2], "k'")


def _consumer(t, op, what, at):
    for _ in range(3):
        users = [n for n in t.outputs if n.op == op]
        if users:
            return users[0]
        casts = [n for n in t.outputs if n.op == "Cast"]
        if len(casts) != 1 or len(t.outputs) != 1:
            break
        t = casts[0].outputs[0]
    raise Reject(f"vit attention: {what} has no {op} consumer", at)


class VitAttentionPattern:
    name = "vit_attention"
    stage = "vit_attention"
    anchors = ("Softmax",)

    def match(self, node, ctx):
        check(node.attrs.get("axis", -1) in (-1, 2), "vit attention: Softmax is not over the last axis", node)
        add = expect(skip(node.inputs[0], CASTS), "Add", "vit attention: scores + mask", node)
        for side in (0, 1):
            inner, s_out = peel_scale(add.inputs[side])
            qk = producer(inner)
            if qk is not None and qk.op == "MatMul":
                mask = add.inputs[1 - side]
                break
        else:
            raise Reject("vit attention: neither side of the Add is q·k^T", add)
        qh, s_q = peel_scale(qk.inputs[0])
        kt, s_k = peel_scale(qk.inputs[1])
        # a scale may also sit before the head transposes, on the roped [T, H, D] q and k (not through a
        # Cast: the plugin must read q and k in the type they have)
        q, s_q0 = peel_scale(_perm(expect(qh, "Transpose", "vit attention: q side of the scores", qk), [1, 0, 2], "q'"),
                             through=())
        k, s_k0 = peel_scale(_k_of(kt, qk), through=())
        pv = _consumer(node.outputs[0], "MatMul", "Softmax", node)
        v = _perm(expect(pv.inputs[1], "Transpose", "vit attention: v side", pv), [1, 0, 2], "v'")
        out_t = [n for n in pv.outputs[0].outputs if n.op == "Transpose"]
        check(len(out_t) == 1 and len(pv.outputs[0].outputs) == 1, "vit attention: P·v is not transposed back", pv)
        _perm(out_t[0], [1, 0, 2], "the output")
        out = out_t[0].outputs[0]
        ropes = [ctx.lookup("vit_rope", skip(t, CASTS)) for t in (q, k)]
        for what, t, m in (("q", q, ropes[0]), ("k", k, ropes[1])):
            check(m is not None, f"vit attention: {what} is not rotated by a 2-D RoPE "
                                 f"({ctx.why_not('vit_rope', skip(t, CASTS))})", qk)
        check(ropes[0].result.angles is ropes[1].result.angles, "vit attention: q and k use different RoPE angles",
              qk)
        head = ropes[0].result.head_size
        check(static_dim(q, -1) in (None, head), f"vit attention: q has {static_dim(q, -1)} dims per head, "
                                                 f"the RoPE {head}", qk)
        return out, VitAttention(q=q, k=k, v=v, out=out, mask=mask, scale=s_out * s_q * s_k * s_q0 * s_k0,
                                 num_heads=static_dim(q, 1), head_size=head)


PATTERN = VitAttentionPattern()
