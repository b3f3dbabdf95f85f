"""A routed Mixture-of-Experts block, as transformers' `batched_mm` experts export it (Qwen3-MoE, Qwen2-MoE):

    logits = Gemm(x, router, transB=1)            [T, E]   (or MatMul(x, router[H, E]))
    p = Softmax(logits); w, idx = TopK(p, k)                 (w / ReduceSum(w) where norm_topk_prob)
    per (token, choice): W = GatherND(gate_up[E, 2I, H], idx); a = Squeeze(MatMul(W, Unsqueeze(x_rep)))
                         gate, up = Split(a) ; m = gate * Sigmoid(gate) * up
                         d = Squeeze(MatMul(GatherND(down[E, H, I], idx), Unsqueeze(m))) * w
    out = ReduceSum(Reshape(d, [T, k, H]), axis=1)

Anchored on the TopK. It reads E, k, H, I and the renormalization off the graph and checks each link; anything
else (expert biases, another activation, gate and up in other halves, a router bias) is rejected with the reason.
"""

from onnx_rewriter.matching import CASTS, MoeBlock, Reject, attr, check, const, expect, is_weight, skip


def _readers(t, op=None):
    return [n for n in t.outputs if op is None or n.op == op]


def _only(t, op, what, at):
    nodes = _readers(t, op)
    if len(nodes) != 1:
        raise Reject(f"{what}: expected one {op} reading '{t.name}', found {len(nodes)}", at)
    return nodes[0]


def _through(t, ops):
    """Follow single readers of `ops` (Reshape, Unsqueeze, ...) down from t; returns the last tensor."""
    while True:
        nxt = [n for n in t.outputs if n.op in ops]
        if len(nxt) != 1 or len(t.outputs) != 1:
            return t
        t = nxt[0].outputs[0]


def _int(t) -> int | None:
    v = const(t)
    return int(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def _axes(node):
    if len(node.inputs) > 1 and node.inputs[1].name:
        v = const(node.inputs[1])
        return None if v is None else [int(a) for a in v.reshape(-1)]
    a = attr(node, "axes")
    return None if a is None else [int(x) for x in a]


class MoeBlockPattern:
    name = "moe_block"
    stage = "moe"
    anchors = ("TopK",)

    def match(self, node, ctx):
        topk = node
        k = _int(topk.inputs[1]) if len(topk.inputs) > 1 else None
        check(k is not None and k > 0, "TopK: k is not a constant", topk)
        check(attr(topk, "largest", 1) == 1 and attr(topk, "axis", -1) in (-1, 1), "TopK: not the largest k on the "
              "last axis", topk)
        sm = expect(skip(topk.inputs[0], CASTS), "Softmax", "router probabilities", topk)
        check(attr(sm, "axis", -1) in (-1, 1), "router Softmax: not over the last axis", sm)
        logits = skip(sm.inputs[0], CASTS)
        gemm = expect(logits, ("Gemm", "MatMul"), "router logits", sm)
        x, w = gemm.inputs[0], gemm.inputs[1]
        check(is_weight(w) and len(w.shape) == 2, "router: weight is not a 2-D constant", gemm)
        if gemm.op == "Gemm":
            check(attr(gemm, "transA", 0) == 0 and attr(gemm, "alpha", 1.0) == 1.0, "router Gemm: transA or alpha",
                  gemm)
            check(len(gemm.inputs) < 3 or not gemm.inputs[2].name, "router Gemm has a bias (no MoE plugin mapping "
                  "written for it)", gemm)
            e, h = (w.shape if attr(gemm, "transB", 0) else w.shape[::-1])
        else:
            h, e = w.shape
        check(len(x.shape or ()) == 2 and x.shape[-1] == h, f"router input is not [T, {h}]", gemm)
        check(sm.outputs[0].shape is not None and sm.outputs[0].shape[-1] == e, "router Softmax width is not E", sm)
        check(k <= e, f"top-{k} of {e} experts", topk)
        values, indices = topk.outputs

        # renormalization: w / ReduceSum(w, -1, keepdims) (norm_topk_prob), or w as it is
        sums = _readers(values, "ReduceSum")
        renormalize = bool(sums)
        weights = values
        if renormalize:
            rs = sums[0]
            check(_axes(rs) in ([-1], [1]) and attr(rs, "keepdims", 1) == 1, "top-k weight sum: not over the last "
                  "axis with keepdims", rs)
            div = _only(values, "Div", "top-k renormalization", rs)
            check(div.inputs[0] is values and div.inputs[1] is rs.outputs[0], "top-k renormalization: not w / sum(w)",
                  div)
            weights = div.outputs[0]

        # experts: the indices pick the stacked weights (GatherND)
        idx = _through(indices, ("Reshape", "Unsqueeze", "Cast"))
        gathers = _readers(idx, "GatherND")
        check(len(gathers) == 2 and all(is_weight(g.inputs[0]) and len(g.inputs[0].shape) == 3 for g in gathers),
              f"top-k indices: expected two GatherND of stacked [E, ., .] expert weights, found {len(gathers)}", topk)
        by_shape = {}
        for g in gathers:
            check(attr(g, "batch_dims", 0) == 0, "expert GatherND with batch_dims", g)
            by_shape[tuple(g.inputs[0].shape)] = g
        gu_n, dn_n = None, None
        for shape, g in by_shape.items():
            if shape[0] == e and shape[2] == h:
                gu_n = g
            elif shape[0] == e and shape[1] == h:
                dn_n = g
        check(gu_n is not None and dn_n is not None and gu_n is not dn_n,
              f"expert weights {sorted(by_shape)}: not one [E, 2I, H] and one [E, H, I] ({e} experts, H = {h})", topk)
        inter = dn_n.inputs[0].shape[2]
        check(gu_n.inputs[0].shape[1] == 2 * inter, f"gate_up has {gu_n.inputs[0].shape[1]} rows, down I = {inter}",
              gu_n)

        # FC1: MatMul(W_gu, Unsqueeze(x repeated k times)) -> Squeeze -> Split(gate, up)
        mm1 = _only(gu_n.outputs[0], "MatMul", "FC1", gu_n)
        check(mm1.inputs[0] is gu_n.outputs[0], "FC1: the gathered weight is not the left operand", mm1)
        views = ("Unsqueeze", "Reshape", "Expand")
        check(skip(mm1.inputs[1], views) is skip(x, views),
              "FC1 does not read the router's input tokens (repeated k times)", mm1)
        fc1 = _through(mm1.outputs[0], ("Squeeze",))
        split = _only(fc1, "Split", "gate/up split", mm1)
        check(len(split.outputs) == 2, "gate/up split: not two halves", split)
        check(all(o.shape is not None and o.shape[-1] == inter for o in split.outputs),
              f"gate/up split: not two halves of {inter}", split)
        gate, up = split.outputs
        sig = _only(gate, "Sigmoid", "SiLU of the gate half (the first half)", split)
        silu = [n for n in _readers(gate, "Mul") if sig.outputs[0] in n.inputs]
        check(len(silu) == 1, "gate half: not gate * Sigmoid(gate) (SiLU)", sig)
        act = _only(silu[0].outputs[0], "Mul", "SwiGLU product", silu[0])
        check(up in act.inputs, "SwiGLU: the SiLU of the gate half is not multiplied by the up half", act)

        # FC2: MatMul(W_down, Unsqueeze(m)) -> Squeeze, times the routing weight, summed over the k choices
        mm2 = _only(dn_n.outputs[0], "MatMul", "FC2", dn_n)
        check(skip(mm2.inputs[1], ("Unsqueeze",)) is act.outputs[0], "FC2 does not read the SwiGLU output", mm2)
        d = _through(mm2.outputs[0], ("Squeeze",))
        mul = _only(d, "Mul", "routing weight", mm2)
        other = mul.inputs[1] if mul.inputs[0] is d else mul.inputs[0]
        check(skip(other, ("Unsqueeze", "Reshape", "Cast")) is weights,
              "experts' output is not weighted by the " + ("renormalized " if renormalize else "") + "top-k weights",
              mul)
        summed = _only(_through(mul.outputs[0], ("Reshape",)), "ReduceSum", "sum over the top-k choices", mul)
        check(_axes(summed) == [1] and attr(summed, "keepdims", 1) == 0, "sum over the top-k choices: not axis 1",
              summed)
        out = summed.outputs[0]
        check(len(out.shape or ()) == 2 and out.shape[-1] == h, f"MoE output is not [T, {h}]", summed)
        return out, MoeBlock(x=x, router_logits=logits, router=w, gate_up=gu_n.inputs[0], down=dn_n.inputs[0],
                             experts=int(e), top_k=k, inter=int(inter), hidden=int(h), renormalize=renormalize,
                             out=out)


PATTERN = MoeBlockPattern()
