"""GQA repeat_kv: Reshape(Expand(Unsqueeze(x, 2), [B, Hkv, G, T, D]), [B, Hkv*G, T, D])."""

from onnx_rewriter.matching import RepeatKV, check, const, expect, static_dim


class RepeatKv:
    name = "repeat_kv"
    stage = "repeat_kv"
    anchors = ("Reshape",)

    def match(self, node, ctx):
        exp = expect(node.inputs[0], "Expand", "repeat_kv", node)
        unsq = expect(exp.inputs[0], "Unsqueeze", "repeat_kv", exp)
        axes = const(unsq.inputs[1]) if len(unsq.inputs) > 1 else unsq.attrs.get("axes")
        check(axes is not None and [int(a) for a in list(axes.reshape(-1))] == [2],
              "repeat_kv: Unsqueeze is not on axis 2", unsq)
        x = unsq.inputs[0]
        hkv, hq = static_dim(x, 1), static_dim(node.outputs[0], 1)
        groups = hq // hkv if hkv and hq and hq % hkv == 0 else None
        return node.outputs[0], RepeatKV(x=x, groups=groups)


PATTERN = RepeatKv()
