"""RoPE as rotate_half: Add(Mul(x, cos'), Mul(Concat(Neg(Slice(x, h:)), Slice(x, :h)), sin')).

cos' and sin' are the shared table broadcast over heads (Unsqueeze, maybe Cast / Mul(attention_scaling)).
Step-1 half slices only: interleaved (GPT-J) pairs fail here and are refused by `rope_interleaved`.
"""

import dataclasses

import numpy as np

from onnx_rewriter.matching import (
    Reject,
    RopeApply,
    check,
    expect,
    peel_scale,
    producer,
    rope_cos_operand,
    rope_sin_operand,
    skip,
    slice_bounds,
)

BROADCAST = ("Unsqueeze", "Cast", "Reshape", "Expand")


class RotateHalf:
    name = "rotate_half"
    stage = "rope"
    anchors = ("Add",)

    def match(self, node, ctx):
        muls = [producer(i) for i in node.inputs]
        check(all(m is not None and m.op == "Mul" for m in muls), "rope: Add of two Muls expected", node)
        # Which Mul carries cos (x * cos') and which sin (rot(x) * sin'), in either operand order.
        hit = rope_cos_operand(node, lambda t: _lookup_scaled(ctx, t))
        if hit is None:
            raise _reject("rope: neither Mul reads a recognized cos table", node, ctx, muls)
        x, (m, cs), sin_mul = hit
        return self._finish(node, ctx, x, m.result, cs, sin_mul)

    def _finish(self, node, ctx, x, table, cos_scale, sin_mul):
        hit = rope_sin_operand(sin_mul, lambda t: _sin_scale(t, table.sin))
        if hit is None:
            raise _reject("rope: the other Mul does not read the matching sin table", sin_mul, ctx, [])
        rot, ss = hit
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
        return node.outputs[0], RopeApply(x=x, table=_scaled(ctx, table, cos_scale), rotary_dim=d,
                                          patterns=[self.name])


def _lookup_scaled(ctx, t):
    """(the rope_table match, the scale on it) for a cos operand, or None."""
    tab_t, scale = peel_scale(t, BROADCAST)
    m = ctx.lookup("rope_table", tab_t)
    return None if m is None else (m, scale)


def _sin_scale(t, sin):
    """The scale on an operand that reads the table's `sin`, or None."""
    tab_t, scale = peel_scale(t, BROADCAST)
    return scale if tab_t is sin else None


def _scaled(ctx, table, scale):
    """`table` as this RoPE reads it: times `scale` (e.g. YaRN's attention_scaling on cos and sin). The
    rope_table stage's result is shared and stays as matched; every application with the same scale gets
    one and the same scaled copy, so that q and k (and all layers) still share one table."""
    if scale == table.attention_scaling:
        return table
    copies = ctx.info.setdefault("scaled_rope_tables", {})
    key = (id(table), scale)
    if key not in copies:
        copies[key] = dataclasses.replace(table, attention_scaling=scale)
    return copies[key]


def _reject(reason, node, ctx, muls):
    # Name the table-level reason when a cos table candidate was seen but did not match.
    for m in muls:
        for i in m.inputs if m is not None else []:
            t = skip(i, BROADCAST)
            if producer(t) is not None and producer(t).op in ("Cos", "Sin"):
                return Reject(f"{reason} ({ctx.why_not('rope_table', t)})", node)
    return Reject(reason, node)


PATTERN = RotateHalf()
