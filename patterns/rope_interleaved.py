"""Interleaved (GPT-J style) RoPE, recognized only to refuse it: the plugin rotates halves, not pairs.

GPT-J's rotate_every_two is `stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)`, exported as
`Reshape(Concat(Unsqueeze(Neg(Slice(x, 1::2))), Unsqueeze(Slice(x, 0::2)), axis=-1))` and multiplied
by a sin table (GPT-J gathers cos/sin rows from a constant cache, which no rope_table pattern
matches, so rotate_half never gets as far as its own interleave check). The refusal is structural
and does not depend on how the table is computed.
"""

from onnx_rewriter.matching import Refuse, Reject, producer, skip, slice_bounds

PASS = ("Neg", "Unsqueeze", "Reshape", "Cast")


def _step2_slices(cat):
    """Slice inputs of `cat` (through Neg/Unsqueeze) that take every second element."""
    found = []
    for t in cat.inputs:
        n = producer(skip(t, PASS))
        b = slice_bounds(n) if n is not None and n.op == "Slice" else None
        if b is not None and b[3] == 2:
            found.append(n)
    return found


class RopeInterleaved:
    name = "rope_interleaved"
    stage = "rope"
    anchors = ("Add",)

    def match(self, node, ctx):
        muls = [producer(i) for i in node.inputs]
        if not all(m is not None and m.op == "Mul" for m in muls):
            raise Reject("interleaved rope: Add of two Muls expected", node)
        for mul in muls:
            for operand in mul.inputs:
                cat = producer(skip(operand, ("Reshape", "Flatten", "Cast")))
                if cat is None or cat.op != "Concat" or len(cat.inputs) != 2:
                    continue
                if len(_step2_slices(cat)) == 2:
                    raise Refuse("interleaved (GPT-J style) RoPE rotates element pairs (x[..., ::2], x[..., 1::2]); "
                                 "the AttentionPlugin kernel only rotates halves (rotate_half), so this model "
                                 "cannot be rewritten", cat)
        raise Reject("not interleaved", node)


PATTERN = RopeInterleaved()
