"""Finding the per-head q/k RMSNorm directly in front of RoPE (used by attention_layer)."""

from dataclasses import replace

from onnx_rewriter.matching import CASTS, producer, skip


def qk_norm_before(ctx, x, head_size):
    """The QKNorm whose output is `x` ([B, H, S, D], the tensor entering RoPE), or None.

    Qwen3 normalizes [B, S, H, D] and then transposes (layout "bshd"); Gemma3 normalizes after the
    transpose ("bhsd"). Only a gamma of head size on a 4-D input counts: anything else is not a
    per-head norm the plugin could take over, and stays where it is.
    """
    t, layout = skip(x, CASTS), "bhsd"
    n = producer(t)
    if n is not None and n.op == "Transpose" and list(n.attrs.get("perm", [])) == [0, 2, 1, 3]:
        t, layout = skip(n.inputs[0], CASTS), "bshd"
    m = ctx.lookup("qk_norm", t)
    if m is None:
        return None
    norm = m.result
    shape = norm.x.shape
    if norm.weight is None or norm.weight.size != head_size or shape is None or len(shape) != 4:
        return None
    return replace(norm, layout=layout)
