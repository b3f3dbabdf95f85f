"""An export that already carries a KV cache (Optimum style): present = Concat(past, new, axis=-2).

`past` (`past_key_values.N.key/value`) is a graph input [B, Hkv, P, D], `new` this call's roped k or
raw v [B, Hkv, S, D], and `present` a graph output. The plugin owns the cache, so the layer match
looks through this Concat to `new`; the target's own cache I/O replaces past and present, and the
mask / positions computed from the past length become dead (the probe checks them with a past).
"""

from onnx_rewriter.matching import KVCacheConcat, check, producer


class KvCacheConcat:
    name = "kv_cache_concat"
    stage = "kv_cache"
    anchors = ("Concat",)

    def match(self, node, ctx):
        check(len(node.inputs) == 2, "kv cache: not a 2-way Concat", node)
        past, new = node.inputs
        out = node.outputs[0]
        rank = len(out.shape) if out.shape is not None else None
        check(node.attrs.get("axis") in (-2, 2) and rank in (None, 4), "kv cache: Concat is not on the sequence "
              "axis of a [B, H, T, D] tensor", node)
        while (n := producer(past)) is not None and n.op in ("Concat", "Identity") and len(n.inputs) == 1:
            past = n.inputs[0]  # TorchScript keeps a 1-input Concat on some past inputs
        check(past in ctx.graph.inputs, "kv cache: first part is not a graph input (past_key_values)", node)
        check(out in ctx.graph.outputs, "kv cache: result is not a graph output (present)", node)
        return out, KVCacheConcat(past=past, new=new, present=out)


PATTERN = KvCacheConcat()
