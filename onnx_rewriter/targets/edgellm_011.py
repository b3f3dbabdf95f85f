"""Target `edgellm-0.11` (runtime 0.11): token-major graph, packed qkv, paged KV pool (contract section 4).

The exporter's batch-major body is kept: `inputs_embeds [T, H]` is unsqueezed to [1, T, H] and runs
through it as one row of T tokens, which is exact because outside attention every op works per token
(attention, the only op mixing tokens, becomes the plugin, which separates the sequences itself).
Per layer q, k, v ([1, H, T, D]) are packed into `qkv [T, (Hq+2Hkv)·D]`, and the plugin's `[T, Hq, D]`
goes back in as [1, Hq, T, D]. Before lm_head the final hidden state is cut to the `logits_indices` rows.

A per-head q/k RMSNorm moves into the plugin (`enable_qk_norm=1`, gammas at inputs 6 and 7): q and k
then enter before the norm. The softmax scale is the `attention_scale` attribute (q cannot be
pre-scaled in front of a norm).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_rewriter.matching.results import AttentionLayer

from .base import (
    Build,
    Emitter,
    PluginWiring,
    Target,
    flat_input,
    lm_head_input,
    pack_qkv,
    rope_input,
    set_io,
    set_logits_output,
)

PAGE_SIZE = 128  # tokens per KV page, fixed by the runtime
T, N, PAGES = "num_tokens", "num_sequences", "num_pages"

# Graph inputs after inputs_embeds and the KV pools, in the contract's order: (name, dtype, shape).
METADATA = [
    ("positions", np.int32, [T]),
    ("query_start_offsets", np.int32, ["num_sequences_plus_1"]),
    ("query_lengths", np.int32, [N]),
    ("past_lengths", np.int32, [N]),
    ("attention_sequence_lengths", np.int32, [N]),
    ("state_indices", np.int32, [N]),
    ("execution_phase_marker", np.int32, ["execution_phase"]),  # only its length is read
    ("context_sequence_count_carrier", np.int32, ["num_context_sequences"]),  # only its length is read
    ("kv_page_table", np.int32, [N, 2, "max_pages_per_sequence"]),
    ("logits_indices", np.int64, ["num_logits"]),
]
# Plugin inputs around the optional gammas (which go between these two groups).
PLUGIN_HEAD = ("qkv", "past", "query_lengths", "rope_rotary_cos_sin", "past_lengths", "kv_page_table")
PLUGIN_TAIL = ("query_start_offsets", "attention_sequence_lengths", "execution_phase_marker",
               "context_sequence_count_carrier")


def moved_norms(layer: AttentionLayer):
    """(q_norm, k_norm) when the plugin can take both over (same eps), else None (they stay in the graph)."""
    qn, kn = layer.q_norm, layer.k_norm
    if qn is None or kn is None or qn.x is None or kn.x is None or qn.eps is None or kn.eps is None:
        return None
    if abs(qn.eps - kn.eps) > 1e-12 * max(1.0, abs(qn.eps)):
        return None
    return qn, kn


def flat_qkv(em: Emitter, layer: AttentionLayer, norms) -> tuple:
    """q, k, v as [B, S, H·D]; q and k taken before their norms where the plugin normalizes (`norms`)."""
    d, hkv = layer.head_size, layer.num_kv_heads
    if norms:
        q = flat_input(em, layer, norms[0].x, layer.num_q_heads, d, norms[0].layout)
        k = flat_input(em, layer, norms[1].x, hkv, d, norms[1].layout)
    else:
        q = flat_input(em, layer, layer.q, layer.num_q_heads, d)
        k = flat_input(em, layer, layer.k, hkv, d)
    return q, k, flat_input(em, layer, layer.v, hkv, d)


def norm_warnings(layers, warn) -> None:
    """Where a per-head q/k norm cannot move into the plugin (moved_norms), and stays in the graph."""
    for l in layers:
        if (l.q_norm is None) != (l.k_norm is None):
            warn(f"layer {l.index}: only one of q and k has a per-head RMSNorm; it stays in the graph")
        elif l.q_norm is not None and moved_norms(l) is None:
            warn(f"layer {l.index}: q and k norms use different eps; they stay in the graph")


class Edgellm011(Target):
    name = "edgellm-0.11"
    edgellm_version = "0.11.0"
    releases = "0.11"
    domain = "trt_edgellm"
    opset = 24
    chat_template_file = "chat_template.jinja"
    token_major = True

    def check(self, layers, warn) -> None:
        super().check(layers, warn)
        norm_warnings(layers, warn)

    def plugin_attrs(self, layer: AttentionLayer, norms=None) -> dict:
        attrs = super().plugin_attrs(layer)
        attrs.update({
            "enable_context_mask_selector": 0, "enable_vision_block_attention": 0,
            "attention_scale": float(layer.scale), "skip_softmax_scale_factor": 0.0,
            "rms_norm_eps": float(norms[0].eps) if norms else 1e-6, "enable_qk_norm": int(bool(norms)),
            "qk_norm_post_rope": 0, "enable_kv_shared": 0, "enable_attention_sink": 0,
            "enable_contiguous_query_swa": 0, "plugin_version": "1",
        })
        return attrs

    def build(self, b: Build) -> None:
        g = b.graph
        np_float = onnx.helper.tensor_dtype_to_np_dtype(b.float_type)
        l0 = b.layers[0]
        hkv, d, r = l0.num_kv_heads, l0.head_size, l0.rotary_dim
        hidden = int(b.inputs_embeds.shape[-1])
        em = Emitter(g, "edgellm")

        # Token-major entry: the old [B, S, H] input becomes Unsqueeze(inputs_embeds [T, H]).
        embeds = gs.Variable("inputs_embeds", np_float, [T, hidden])
        body = b.inputs_embeds
        body.name, body.dtype, body.shape = "inputs_embeds_batch_major", np_float, [1, T, hidden]
        g.nodes.append(gs.Node("Unsqueeze", name="edgellm/inputs_embeds/Unsqueeze",
                               inputs=[embeds, em.const("axes", np.array([0], dtype=np.int64))], outputs=[body]))
        rope = gs.Variable("rope_rotary_cos_sin", np.float32, [T, r])
        meta = {name: gs.Variable(name, dt, shape) for name, dt, shape in METADATA}
        named = {**meta, "rope_rotary_cos_sin": rope}

        baked, rows_of = {}, {}

        def layer_inputs(lem, layer, past):
            i = layer.index
            layer_rope = rope_input(layer, b, rope, baked)
            if layer_rope is not rope:
                # A table config.json does not describe (llama3 scaling, Gemma3's local layers) is baked as [1, P, R];
                # the plugin wants one row per token: Gather them by `positions`.
                if layer_rope.name not in rows_of:
                    picked = em.node("Gather", [layer_rope, meta["positions"]], {"axis": 1})
                    rows_of[layer_rope.name] = em.node("Squeeze",
                            [picked, em.const("axes", np.array([0], dtype=np.int64))])
                layer_rope = rows_of[layer_rope.name]
            norms = moved_norms(layer)
            q, k, v = flat_qkv(lem, layer, norms)
            packed = pack_qkv(lem, q, k, v)
            qkv = lem.node("Squeeze", [packed, lem.const("axes", np.array([0], dtype=np.int64))])
            gammas = []
            if norms:
                gammas = [gs.Constant(f"layers.{i}/attn/{w}_norm_gamma",
                                      np.asarray(n.weight, dtype=np_float).reshape(-1))
                          for w, n in zip("qk", norms)]
            named["rope_rotary_cos_sin"] = layer_rope
            inputs = ([qkv, past] + [named[n] for n in PLUGIN_HEAD[2:]] + gammas
                      + [named[n] for n in PLUGIN_TAIL])
            return inputs, self.plugin_attrs(layer, norms)

        def layer_output(lem, attn):
            # [T, Hq, D] -> [1, Hq, T, D], the core's layout the graph continues from.
            batched = lem.node("Unsqueeze", [attn, lem.const("axes", np.array([0], dtype=np.int64))])
            return lem.node("Transpose", [batched], {"perm": [0, 2, 1, 3]})

        pasts, presents = self.plugin_layers(b, np_float, PluginWiring(
            cache_shape=[2, PAGES, PAGE_SIZE, hkv, d], out_shape=lambda layer: [T, layer.num_q_heads, d],
            layer_inputs=layer_inputs, layer_output=layer_output,
            flat_shape=lambda layer: [1, -1, layer.num_q_heads * d]))

        # Only the rows named by logits_indices reach lm_head: [1, T, H] -> [T, H] -> [N, H].
        mm, idx = lm_head_input(b.logits)
        rows = em.node("Squeeze", [mm.inputs[idx], em.const("axes", np.array([0], dtype=np.int64))])
        mm.inputs[idx] = em.node("Gather", [rows, meta["logits_indices"]], {"axis": 0})
        vocab = "vocab_size" if b.logits.shape is None else b.logits.shape[-1]
        logits = set_logits_output(g, b.logits, ["num_logits", vocab])
        set_io(b, embeds, pasts, [rope] + list(meta.values()), logits, presents)


TARGET = Edgellm011()
