"""Target `edgellm-0.10` (runtime 0.10.x): batch-major like 0.9, 0.11's packed qkv and paged KV pool
(contract part 3 §17).

I/O as 0.9 (`inputs_embeds [B, S, H]`, `context_lengths`, `rope_rotary_cos_sin [1 or B, P, R]`,
`kvcache_start_index`, `last_token_ids`) plus `kv_page_table [B, 2, max_pages_per_sequence]`; the cache
`past_key_values_i` is the pool `[2, num_pages, 128, Hkv, D]`. The plugin's inputs are compacted: qkv,
pool, context_lengths, rope, kvcache_start_index, kv_page_table, then the q/k-norm gammas where the
plugin normalizes (`enable_qk_norm=1`, as 0.11: q and k enter before the norm). The softmax scale is the
`attention_scale` attribute; there is no `plugin_version` (that is 0.11's). `skip_softmax_scale` is
left out: NVIDIA wires it only when `skip_softmax_scale_factor` > 0 (*inference: safe*, §17.1).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .edgellm_011 import PAGE_SIZE, PAGES, flat_qkv, moved_norms, norm_warnings
from .edgellm_09 import DenseTarget

MAX_QK_NORM_HEAD = 256  # enable_qk_norm needs D <= 256 (contract 3 §17.2); beyond it the norms stay in the graph
PAGE_TABLE = ("kv_page_table", np.int32, ["kv_page_table_batch", 2, "max_pages_per_sequence"])  # own batch symbol


class Edgellm010(DenseTarget):
    name = "edgellm-0.10"
    edgellm_version = "0.10.0"
    releases = "0.10.x"
    domain = "trt_edgellm"
    opset = 24

    packed_qkv = True

    def check(self, layers, warn) -> None:
        super().check(layers, warn)
        norm_warnings(layers, warn)  # q/k-norm moves into the plugin exactly as on 0.11
        if layers[0].q_norm is not None and layers[0].head_size > MAX_QK_NORM_HEAD:
            warn(f"head size {layers[0].head_size} > {MAX_QK_NORM_HEAD}: the 0.10 plugin cannot normalize q/k; "
                 f"the norms stay in the graph")

    def cache_shape(self, hkv: int, d: int) -> list:
        return [2, PAGES, PAGE_SIZE, hkv, d]

    def extra_inputs(self) -> list:
        name, dtype, shape = PAGE_TABLE
        return [gs.Variable(name, dtype, shape)]

    def plugin_attrs(self, layer, norms=None) -> dict:
        attrs = super().plugin_attrs(layer)
        attrs.update({
            "enable_context_mask_selector": 0, "enable_vision_block_attention": 0,
            "attention_scale": float(layer.scale), "skip_softmax_scale_factor": 0.0,
            "rms_norm_eps": float(norms[0].eps) if norms else 1e-6, "enable_qk_norm": int(bool(norms)),
            "enable_kv_shared": 0,
        })
        return attrs

    def layer_inputs(self, em, layer, past, named: dict, rope, np_float):
        d = layer.head_size
        norms = moved_norms(layer) if d <= MAX_QK_NORM_HEAD else None
        q, k, v = flat_qkv(em, layer, norms)  # q and k before their norms where the plugin normalizes
        gammas = [gs.Constant(f"layers.{layer.index}/attn/{w}_norm_gamma",
                              np.asarray(n.weight, dtype=np_float).reshape(-1)) for w, n in zip("qk", norms or ())]
        inputs = [self.attention_inputs(em, q, k, v)[0], past, named["context_lengths"], rope,
                  named["kvcache_start_index"], named["kv_page_table"], *gammas]
        return inputs, self.plugin_attrs(layer, norms)


TARGET = Edgellm010()
