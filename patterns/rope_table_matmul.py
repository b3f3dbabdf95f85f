"""cos/sin table, transformers-4 form: f = Transpose(MatMul(inv_freq[None,:,None], positions[:,None,:]))."""

from ._rope_common import angles_matmul, table_from_angles


class RopeTableMatMul:
    name = "rope_table_matmul"
    stage = "rope_table"
    anchors = ("Cos",)

    def match(self, node, ctx):
        return table_from_angles(node, lambda angles: angles_matmul(angles, node, "rope angles"))


PATTERN = RopeTableMatMul()
