"""A decoder layer's attention: roped q, k (through repeat_kv) and v (through repeat_kv) into the core.

This is where the small matches meet: it checks that q and k are roped by the same table over the
same dims, that k and v carry the same KV heads, and that the shapes agree, and it names the first
check that fails so a refused layer says why.
"""

from onnx_rewriter.matching import AttentionLayer, Reject, check, static_dim

from ._qk_norm import qk_norm_before
from ._same_shape import readers

ROPE_STAGES = ("rope_partial", "rope")


class AttentionLayerPattern:
    name = "attention_layer"
    stage = "attention_layer"
    anchors = ("Softmax", "Attention")

    def match(self, node, ctx):
        cm = ctx.anchor_match("attention_core", node)
        if cm is None:
            misses = ctx.anchor_misses("attention_core", node)
            raise Reject("; ".join(m.describe() for m in misses) or "attention core not recognized", node)
        core = cm.result
        qr = ctx.lookup(ROPE_STAGES, core.q)
        check(qr is not None, f"q is not roped by a recognized RoPE ({ctx.why_not(ROPE_STAGES, core.q)})", node)
        k_rep = ctx.lookup("repeat_kv", core.k)
        v_rep = ctx.lookup("repeat_kv", core.v)
        k_roped = k_rep.result.x if k_rep else core.k
        v = v_rep.result.x if v_rep else core.v
        # An export with its own KV cache attends to Concat(past, new): the plugin keeps the cache.
        k_cat, v_cat = ctx.lookup("kv_cache", k_roped), ctx.lookup("kv_cache", v)
        check(bool(k_cat) == bool(v_cat), "a KV cache Concat on only one of k and v", node)
        if k_cat:
            k_roped, v = k_cat.result.new, v_cat.result.new
        kr = ctx.lookup(ROPE_STAGES, k_roped)
        check(kr is not None, f"k is not roped by a recognized RoPE ({ctx.why_not(ROPE_STAGES, k_roped)})", node)
        qr, kr = qr.result, kr.result
        check(qr.table is kr.table, "q and k are roped with different cos/sin tables", node)
        check(qr.rotary_dim == kr.rotary_dim, f"q and k rotate {qr.rotary_dim} and {kr.rotary_dim} dims", node)
        d = static_dim(qr.x, -1)
        hq, hkv = static_dim(qr.x, 1), static_dim(v, 1)
        check(bool(d) and bool(hq) and bool(hkv),
              "head count or head size is not static (and positive) in the graph", node)
        check(static_dim(kr.x, -1) == d and static_dim(v, -1) == d, "q, k and v head sizes differ", node)
        check(static_dim(kr.x, 1) == hkv, f"k has {static_dim(kr.x, 1)} heads but v has {hkv}", node)
        check(hq % hkv == 0, f"{hq} q heads are not a multiple of {hkv} kv heads", node)
        check(bool(k_rep) == bool(v_rep), "repeat_kv on only one of k and v", node)
        if k_rep:
            g = hq // hkv
            check(k_rep.result.groups in (None, g) and v_rep.result.groups in (None, g),
                  f"repeat_kv groups differ from {g}", node)
        else:
            check(hq == hkv, f"{hq} q heads attend to {hkv} kv heads without repeat_kv", node)
        check(core.mask is not None, "attention has no mask; the plugin is always causal", node)
        if node.op == "Softmax":
            _check_per_token_output(core.out, hq, d, node, (core.q, qr.x))
        pats = sorted(set(qr.patterns + kr.patterns + [cm.pattern] + (["repeat_kv"] if k_rep else [])
                          + (["kv_cache_concat"] if k_cat else []) + [self.name]))
        layer = AttentionLayer(
            index=-1, q=qr.x, k=kr.x, v=v, out=core.out, num_q_heads=hq, num_kv_heads=hkv, head_size=d,
            rotary_dim=qr.rotary_dim, rope=qr.table, scale=core.scale, mask=core.mask, patterns=pats,
            q_norm=qk_norm_before(ctx, qr.x, d), k_norm=qk_norm_before(ctx, kr.x, d),
            same_shape=[(core.q, qr.x), (k_roped, kr.x), (core.out, qr.x)],  # RoPE and attention keep q's shape
        )
        return core.out, layer


def _check_per_token_output(out, hq, d, node, same=()):
    """The [B, H, S, D] output must go back to per-token rows (Transpose(0,2,1,3), then [.., H·D]) before
    anything reads it. Otherwise the graph mixes tokens outside attention (found by fuzzing: a dropped or
    permuted output Transpose), which no KV-cache decode can reproduce."""
    check(len(out.outputs) > 0, "the attention output is not used", node)
    # Shape side branches read sizes only; TorchScript's shape-keeping Reshape (sizes from q) is looked through.
    for t in readers(out, same):
        check(t.op == "Transpose" and list(t.attrs.get("perm", [])) == [0, 2, 1, 3],
              f"the attention output is read by {t.op} '{t.name}', not by Transpose(0,2,1,3) back to [B, S, H, D]", t)
        for r in t.outputs[0].outputs:
            shape = r.outputs[0].shape if r.op == "Reshape" else None
            if shape is not None:  # a symbolic last dim cannot be compared; a static one must be H·D
                ok = len(shape) == 3 and (shape[-1] == hq * d or not isinstance(shape[-1], int))
                check(ok, f"the attention output is reshaped to {list(shape)}, not [B, S, {hq * d}]", r)


PATTERN = AttentionLayerPattern()
