"""cos/sin table, transformers-5 form: Cos/Sin(Concat(f, f)), f = Mul(Cast(Unsqueeze(positions)), inv_freq).

The older transformers-4 form (MatMul + Transpose) is `rope_table_matmul`.
"""

from onnx_rewriter.layers import RopeTable
from onnx_rewriter.matching import check, const, expect, skip

from ._rope_common import table_from_angles


class RopeTableMul:
    name = "rope_table_mul"
    stage = "rope_table"
    anchors = ("Cos",)

    def match(self, node, ctx):
        def freqs(angles):
            mul = expect(angles, "Mul", "rope angles", node)
            a, b = mul.inputs
            inv = const(b) if const(b) is not None else const(a)
            pos = a if const(b) is not None else b
            check(inv is not None, "rope angles: no constant inv_freq operand", mul)
            return inv, skip(pos, ("Cast", "Unsqueeze")), [mul]

        return table_from_angles(node, freqs)


PATTERN = RopeTableMul()
