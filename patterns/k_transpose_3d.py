"""k^T as dynamo writes it for sdpa: Reshape([B*H, T, D]) -> Transpose(0, 2, 1) -> Reshape([B, H, D, T])."""

from onnx_rewriter.matching import KTranspose, check, expect


class KTranspose3d:
    name = "k_transpose_3d"
    stage = "k_transpose"
    anchors = ("Reshape",)

    def match(self, node, ctx):
        tr = expect(node.inputs[0], "Transpose", "k^T sandwich", node)
        check(list(tr.attrs.get("perm", [])) == [0, 2, 1], "k^T sandwich: Transpose is not (0,2,1)", tr)
        flat = expect(tr.inputs[0], "Reshape", "k^T sandwich", tr)
        k = flat.inputs[0]
        rank_in = len(k.shape) if k.shape is not None else None
        rank_flat = len(flat.outputs[0].shape) if flat.outputs[0].shape is not None else None
        rank_out = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
        check(rank_in in (None, 4) and rank_flat in (None, 3) and rank_out in (None, 4),
              "k^T sandwich: ranks are not 4 -> 3 -> 4", node)
        # The last dim of k must become the second-to-last of the result.
        d_in = k.shape[-1] if k.shape else None
        d_out = node.outputs[0].shape[-2] if node.outputs[0].shape else None
        check(not (isinstance(d_in, int) and isinstance(d_out, int)) or d_in == d_out,
              f"k^T sandwich: head dim {d_in} does not end up at axis -2 ({d_out})", node)
        return node.outputs[0], KTranspose(k=k)


PATTERN = KTranspose3d()
