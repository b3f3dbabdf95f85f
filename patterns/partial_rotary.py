"""Partial rotary (Phi-3, partial_rotary_factor < 1): Concat(rope(Slice(x, :R)), Slice(x, R:))."""

from onnx_rewriter.matching import RopeApply, check, expect, slice_bounds


class PartialRotary:
    name = "partial_rotary"
    stage = "rope_partial"
    anchors = ("Concat",)

    def match(self, node, ctx):
        check(len(node.inputs) == 2 and node.attrs.get("axis") in (-1, 3),
              "partial rope: not a 2-way last-axis Concat", node)
        m = ctx.lookup("rope", node.inputs[0])
        check(m is not None, "partial rope: first part is not a RoPE", node)
        rope = m.result
        head = expect(rope.x, "Slice", "partial rope: roped part", node)
        tail = expect(node.inputs[1], "Slice", "partial rope: pass-through part", node)
        x = head.inputs[0]
        check(tail.inputs[0] is x, "partial rope: the two parts slice different tensors", tail)
        r = rope.rotary_dim
        bh, bt = slice_bounds(head), slice_bounds(tail)
        check(bh is not None and bt is not None, "partial rope: Slice bounds are not constant", head)
        check(bh[:2] == (0, r) and bh[2] in (-1, 3) and bh[3] == 1, f"partial rope: roped part is not [0:{r}]", head)
        check(bt[0] == r and bt[2] in (-1, 3) and bt[3] == 1,
              f"partial rope: pass-through part does not start at {r}", tail)
        return node.outputs[0], RopeApply(x=x, table=rope.table, rotary_dim=r, patterns=rope.patterns + [self.name])


PATTERN = PartialRotary()
