"""k^T as dynamo writes it for sdpa: Reshape([B*H, T, D]) -> Transpose(0, 2, 1) -> Reshape([B, H, D, T])."""

from onnx_rewriter.matching import KTranspose, check, const, expect, producer, static_dim


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
        # The flat Reshape must merge B and H: a fixed leading entry other than B·H (a constant 1 where -1
        # belongs) computes k^T only for one batch size, which the plugin would silently generalize.
        lead = _leading_entry(flat.inputs[1])
        b, h = static_dim(k, 0), static_dim(k, 1)
        check(lead in (None, -1) or (b is not None and h is not None and lead == b * h),
              f"k^T sandwich: Reshape fixes B*H to {lead}", flat)
        return node.outputs[0], KTranspose(k=k)


def _leading_entry(shape) -> int | None:
    """The first entry of a Reshape's target shape when it is a constant (alone or at the head of a Concat)."""
    v = const(shape)
    if v is None:
        cat = producer(shape)
        v = const(cat.inputs[0]) if cat is not None and cat.op == "Concat" and cat.inputs else None
    return int(v.reshape(-1)[0]) if v is not None and v.size else None


PATTERN = KTranspose3d()
