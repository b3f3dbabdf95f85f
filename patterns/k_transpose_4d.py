"""k^T as one Transpose(0, 1, 3, 2) of [B, H, T, D] (TorchScript, eager attention)."""

from onnx_rewriter.matching import KTranspose, check


class KTranspose4d:
    name = "k_transpose_4d"
    stage = "k_transpose"
    anchors = ("Transpose",)

    def match(self, node, ctx):
        check(list(node.attrs.get("perm", [])) == [0, 1, 3, 2], "k^T: perm is not (0,1,3,2)", node)
        return node.outputs[0], KTranspose(k=node.inputs[0])


PATTERN = KTranspose4d()
