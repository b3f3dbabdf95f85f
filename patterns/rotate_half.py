"""RoPE as rotate_half: Add(Mul(x, cos'), Mul(Concat(Neg(Slice(x, h:)), Slice(x, :h)), sin')).

cos' and sin' are the shared table broadcast over heads (Unsqueeze, maybe Cast / Mul(attention_scaling)).
Step-1 half slices only: interleaved (GPT-J) pairs fail here and are refused by `rope_interleaved`.
"""

import numpy as np

from onnx_rewriter.matching import Reject, RopeApply, check, expect, peel_scale, producer, skip, slice_bounds

BROADCAST = ("Unsqueeze", "Cast", "Reshape", "Expand")


class RotateHalf:
    name = "rotate_half"
    stage = "rope"
    anchors = ("Add",)

    def match(self, node, ctx):
        muls = [producer(i) for i in node.inputs]
        check(all(m is not None and m.op == "Mul" for m in muls), "rope: Add of two Muls expected", node)
        # Find which Mul carries cos (x * cos') and which carries sin (rot(x) * sin').
        for cos_mul, sin_mul in (muls, muls[::-1]):
            for xi in (0, 1):
                tab_t, cs = peel_scale(cos_mul.inputs[1 - xi], BROADCAST)
                m = ctx.lookup("rope_table", tab_t)
                if m is not None:
                    x = cos_mul.inputs[xi]
                    return self._finish(node, ctx, x, m.result, cs, sin_mul)
        raise _reject("rope: neither Mul reads a recognized cos table", node, ctx, muls)

    def _finish(self, node, ctx, x, table, cos_scale, sin_mul):
        for ri in (0, 1):
            tab_t, ss = peel_scale(sin_mul.inputs[1 - ri], BROADCAST)
            if tab_t is table.sin:
                rot = sin_mul.inputs[ri]
                break
        else:
            raise _reject("rope: the other Mul does not read the matching sin table", sin_mul, ctx, [])
        check(abs(cos_scale - ss) <= 1e-6 * max(1.0, abs(cos_scale)), "rope: cos and sin scaled differently", sin_mul)
        cat = producer(rot)
        check(cat is not None and cat.op == "Concat", "rope: rotate_half is not a Concat", sin_mul)
        check(len(cat.inputs) == 2 and cat.attrs.get("axis") in (-1, 3),
              "rope: rotate_half Concat is not 2-way on the last axis", cat)
        neg = expect(cat.inputs[0], "Neg", "rope: first half of rotate_half", cat)
        hi = expect(neg.inputs[0], "Slice", "rope: negated half", neg)
        lo = expect(cat.inputs[1], "Slice", "rope: second half of rotate_half", cat)
        check(hi.inputs[0] is x and lo.inputs[0] is x,
              "rope: rotate_half slices another tensor than the one multiplied by cos", cat)
        d = 2 * table.inv_freq.size
        bh, bl = slice_bounds(hi), slice_bounds(lo)
        check(bh is not None and bl is not None, "rope: rotate_half Slice bounds are not constant", hi)
        dim_ok = lambda b: b[2] in (-1, 3) and b[3] == 1
        check(dim_ok(bh) and dim_ok(bl), "rope: rotate_half Slices are not on the last axis with step 1", hi)
        check(bl[0] == 0 and bl[1] == d // 2, f"rope: lower half is [{bl[0]}:{bl[1]}], expected [0:{d // 2}]", lo)
        check(bh[0] == d // 2 and bh[1] >= d, f"rope: upper half is [{bh[0]}:{bh[1]}], expected [{d // 2}:{d}]", hi)
        xd = x.shape[-1] if x.shape else None
        check(xd in (None, d) or not isinstance(xd, (int, np.integer)), f"rope: x has {xd} dims but the table {d}",
              node)
        table.attention_scaling = cos_scale
        return node.outputs[0], RopeApply(x=x, table=table, rotary_dim=d, patterns=[self.name])


def _reject(reason, node, ctx, muls):
    # Name the table-level reason when a cos table candidate was seen but did not match.
    for m in muls:
        for i in m.inputs if m is not None else []:
            t = skip(i, BROADCAST)
            if producer(t) is not None and producer(t).op in ("Cos", "Sin"):
                return Reject(f"{reason} ({ctx.why_not('rope_table', t)})", node)
    return Reject(reason, node)


PATTERN = RotateHalf()
