"""Vision-tower RoPE: Add(Mul(x, cos'), Mul(Concat(Neg(Slice(x, D/2:)), Slice(x, :D/2)), sin')) on [T, H, D].

cos' / sin' are Cos / Sin of Concat(a, a) on the last axis (a: per-patch angles, [T, D/2]) broadcast over
heads (Unsqueeze, Cast). The rotation covers the whole head (Qwen2.5-VL / Qwen3-VL axial 2-D RoPE).
"""

from onnx_rewriter.matching import (
    Reject,
    VitRope,
    check,
    expect,
    producer,
    rope_cos_operand,
    rope_sin_operand,
    skip,
    slice_bounds,
    static_dim,
)

BROADCAST = ("Unsqueeze", "Cast")


def _table(t, op):
    """The angles `a` of op(Concat(a, a)) reached from `t` through broadcasts, or None."""
    node = producer(skip(t, BROADCAST))
    if node is None or node.op != op:
        return None
    cat = producer(node.inputs[0])
    if cat is None or cat.op != "Concat" or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]:
        return None
    return cat.inputs[0] if cat.attrs.get("axis") in (-1, 1) else None


class VitRopePattern:
    name = "vit_rope"
    stage = "vit_rope"
    anchors = ("Add",)

    def match(self, node, ctx):
        muls = [producer(i) for i in node.inputs]
        check(all(m is not None and m.op == "Mul" for m in muls), "vit rope: Add of two Muls expected", node)
        hit = rope_cos_operand(node, lambda t: _table(t, "Cos"))
        if hit is None:
            raise Reject("vit rope: neither Mul reads Cos(Concat(a, a))", node)
        x, angles, sin_mul = hit
        return self._finish(node, x, angles, sin_mul)

    def _finish(self, node, x, angles, sin_mul):
        hit = rope_sin_operand(sin_mul, lambda t: True if _table(t, "Sin") is angles else None)
        if hit is None:
            raise Reject("vit rope: the other Mul does not read Sin of the same angles", sin_mul)
        rot = hit[0]
        cat = expect(rot, "Concat", "vit rope: rotate_half", sin_mul)
        check(len(cat.inputs) == 2 and cat.attrs.get("axis") in (-1, 2),
              "vit rope: rotate_half Concat is not 2-way on the last axis", cat)
        hi = expect(expect(cat.inputs[0], "Neg", "vit rope: first half of rotate_half", cat).inputs[0], "Slice",
                    "vit rope: negated half", cat)
        lo = expect(cat.inputs[1], "Slice", "vit rope: second half of rotate_half", cat)
        check(hi.inputs[0] is x and lo.inputs[0] is x, "vit rope: rotate_half slices another tensor than x", cat)
        bh, bl = slice_bounds(hi), slice_bounds(lo)
        check(bh is not None and bl is not None, "vit rope: rotate_half Slice bounds are not constant", hi)
        check(all(b[2] in (-1, 2) and b[3] == 1 for b in (bh, bl)),
              "vit rope: rotate_half Slices are not on the last axis with step 1", hi)
        half = bl[1]
        check(bl[0] == 0 and bh[0] == half and bh[1] >= 2 * half,
              f"vit rope: halves [{bl[0]}:{bl[1]}] and [{bh[0]}:{bh[1]}] do not split the head in two", lo)
        width = static_dim(angles, -1)
        check(width in (None, half), f"vit rope: {width} angles per patch for a head of {2 * half}", node)
        xd = static_dim(x, -1)
        check(xd in (None, 2 * half), f"vit rope: x has {xd} dims, the rotation {2 * half}", node)
        return node.outputs[0], VitRope(x=x, out=node.outputs[0], angles=angles, head_size=2 * half)


PATTERN = VitRopePattern()
