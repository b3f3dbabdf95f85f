"""The attention core as the ONNX `Attention` op (opset 23, sdpa): Attention(q, k, v, mask){scale}.

Dynamo feeds 4-D [B, H, S, D] q, k and v, with k and v already expanded by repeat_kv and the causal +
padding mask as a boolean 4th input, so the result is an ordinary AttentionCore for attention_layer.
Everything the plugin cannot express is named: soft-capping (refused, as for Softmax cores), an op
that keeps its own cache (past_key/past_value inputs), an implicit causal flag without a mask tensor
(the probe needs the mask to check it), or extra outputs.
"""

from onnx_rewriter.matching import AttentionCore, Refuse, check, static_dim


def _given(node, i):
    return len(node.inputs) > i and bool(node.inputs[i].name)


class OnnxAttentionCore:
    name = "onnx_attention_core"
    stage = "attention_core"
    anchors = ("Attention",)

    def match(self, node, ctx):
        if float(node.attrs.get("softcap", 0.0) or 0.0) != 0.0:
            raise Refuse(f"attention logit soft-capping (Attention softcap={node.attrs['softcap']}, e.g. Gemma 2) "
                         f"cannot be expressed by the AttentionPlugin", node)
        q, k, v = node.inputs[:3]
        check(all(t.shape is not None and len(t.shape) == 4 for t in (q, k, v)),
              "Attention: q, k, v are not 4-D [B, H, S, D] (3-D inputs with q_num_heads are not recognized)", node)
        check(not _given(node, 4) and not _given(node, 5), "Attention: past_key/past_value inputs (an in-op cache) "
              "are not recognized", node)
        check(not _given(node, 6), "Attention: nonpad_kv_seqlen input is not recognized", node)
        check(len([o for o in node.outputs[1:] if o.outputs]) == 0, "Attention: extra outputs are used", node)
        check(node.attrs.get("qk_matmul_output_mode", 0) == 0, "Attention: qk_matmul_output_mode is not 0", node)
        mask = node.inputs[3] if _given(node, 3) else None
        check(mask is not None, "Attention: no mask input" + (" (is_causal=1 alone is not probed)"
                                                             if node.attrs.get("is_causal", 0) else ""), node)
        check(not node.attrs.get("is_causal", 0), "Attention: is_causal=1 on top of a mask input", node)
        d = static_dim(q, -1)
        scale = node.attrs.get("scale")
        if scale is None:
            check(d is not None, "Attention: no scale attribute and the head size is not static", node)
            scale = float(d) ** -0.5
        return node.outputs[0], AttentionCore(q=q, k=k, v=v, out=node.outputs[0], scale=float(scale), mask=mask)


PATTERN = OnnxAttentionCore()
