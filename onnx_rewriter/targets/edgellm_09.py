"""Target `edgellm-0.9` (runtimes 0.6 – 0.9.x): separate q, k, v; dense KV cache; batch-major I/O.

Contract sections 1, 3 and 5: one AttentionPlugin per layer with 7 inputs
(q, k, v, past_key_values_i, context_lengths, rope_rotary_cos_sin, kvcache_start_index).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import (
    CAP,
    KV_START,
    B,
    Build,
    Emitter,
    P,
    PluginWiring,
    S,
    Target,
    flat_input,
    gather_last_tokens,
    pack_qkv,
    prescale_q,
    rope_input,
    set_io,
    set_logits_output,
)


class DenseTarget(Target):
    """Shared by the batch-major targets (0.5, 0.9; 0.10 overrides the cache and the plugin's inputs)."""

    packed_qkv = False

    def attention_inputs(self, em, q, k, v):
        if self.packed_qkv:
            return [pack_qkv(em, q, k, v)]
        return [q, k, v]

    def cache_shape(self, hkv: int, d: int) -> list:
        return [B, 2, hkv, CAP, d]

    def extra_inputs(self) -> list:
        """Graph inputs beyond 0.9's, after kvcache_start_index (fresh Variables for each build)."""
        return []

    def layer_inputs(self, em, layer, past, named: dict, rope, np_float):
        """(plugin inputs, attributes) of one layer; `named`: the graph inputs by name, `rope` the layer's table."""
        d, hkv = layer.head_size, layer.num_kv_heads
        q = prescale_q(em, flat_input(em, layer, layer.q, layer.num_q_heads, d), layer, np_float)
        k = flat_input(em, layer, layer.k, hkv, d)
        v = flat_input(em, layer, layer.v, hkv, d)
        inputs = self.attention_inputs(em, q, k, v) + [
            past, named["context_lengths"], rope, named["kvcache_start_index"]]
        return inputs, self.plugin_attrs(layer)

    def build(self, b: Build) -> None:
        g = b.graph
        np_float = onnx.helper.tensor_dtype_to_np_dtype(b.float_type)
        l0 = b.layers[0]
        hkv, d, r = l0.num_kv_heads, l0.head_size, l0.rotary_dim

        b.inputs_embeds.dtype = np_float
        context_lengths = gs.Variable("context_lengths", np.int32, [B])
        rope = gs.Variable("rope_rotary_cos_sin", np.float32, ["rope_batch", P, r])
        start = gs.Variable("kvcache_start_index", np.int32, [KV_START])
        last = gs.Variable("last_token_ids", np.int64, [B, 1])
        extra = self.extra_inputs()
        named = {t.name: t for t in [context_lengths, start, *extra]}
        em = Emitter(g, "edgellm")
        baked = {}

        def layer_inputs(lem, layer, past):
            return self.layer_inputs(lem, layer, past, named, rope_input(layer, b, rope, baked), np_float)

        # The plugin returns [B, S, Hq, D]; the graph continues from the core's [B, Hq, S, D].
        pasts, presents = self.plugin_layers(b, np_float, PluginWiring(
            cache_shape=self.cache_shape(hkv, d), out_shape=lambda layer: [B, S, layer.num_q_heads, d],
            layer_inputs=layer_inputs,
            layer_output=lambda lem, attn: lem.node("Transpose", [attn], {"perm": [0, 2, 1, 3]}),
            flat_shape=lambda layer: [0, 0, layer.num_q_heads * d]))

        gather_last_tokens(em, b.logits, last, batch_dims=1)
        logits = set_logits_output(g, b.logits, [B, 1, "vocab_size" if b.logits.shape is None else b.logits.shape[-1]])
        set_io(b, b.inputs_embeds, pasts, [rope, context_lengths, start, *extra, last], logits, presents)


class Edgellm09(DenseTarget):
    # attention_scale exists from 0.9.1 only: the base attributes, a non-default scale pre-applied to q.
    name = "edgellm-0.9"
    edgellm_version = "0.9.0"
    releases = "0.6 – 0.9.x"


TARGET = Edgellm09()
