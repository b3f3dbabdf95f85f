"""cos/sin table, transformers-4 form: f = Transpose(MatMul(inv_freq[None,:,None], positions[:,None,:]))."""

from onnx_rewriter.matching import check, const, expect, skip

from ._rope_common import table_from_angles


class RopeTableMatMul:
    name = "rope_table_matmul"
    stage = "rope_table"
    anchors = ("Cos",)

    def match(self, node, ctx):
        def freqs(angles):
            tr = expect(angles, "Transpose", "rope angles", node)
            check(list(tr.attrs.get("perm", [])) == [0, 2, 1], "rope angles: Transpose is not (0,2,1)", tr)
            mm = expect(tr.inputs[0], "MatMul", "rope angles", tr)
            inv_t = skip(mm.inputs[0], ("Expand", "Cast", "Unsqueeze", "Reshape"))
            inv = const(inv_t)
            check(inv is not None, "rope angles: MatMul has no constant inv_freq operand", mm)
            return inv, skip(mm.inputs[1], ("Cast", "Unsqueeze")), [tr, mm]

        return table_from_angles(node, freqs)


PATTERN = RopeTableMatMul()
