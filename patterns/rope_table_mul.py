"""cos/sin table, transformers-5 form: Cos/Sin(Concat(f, f)), f = Mul(Cast(Unsqueeze(positions)), inv_freq).

The older transformers-4 form (MatMul + Transpose) is `rope_table_matmul`.
"""

from ._rope_common import angles_mul, table_from_angles


class RopeTableMul:
    name = "rope_table_mul"
    stage = "rope_table"
    anchors = ("Cos",)

    def match(self, node, ctx):
        return table_from_angles(node, lambda angles: angles_mul(angles, node, "rope angles"))


PATTERN = RopeTableMul()
