"""Target `edgellm-0.5` (runtimes 0.4 – 0.5, AutoDeploy's first form): packed qkv, dense KV cache.

As 0.9 (contract sections 1, 3, 5) except for the plugin's first input: one `qkv [B, S, (Hq+2Hkv)·D]`,
Q, K, V concatenated on the last axis, then past_key_values_i, context_lengths, rope_rotary_cos_sin,
kvcache_start_index: 5 inputs.
"""

from __future__ import annotations

from .edgellm_09 import DenseTarget


class Edgellm05(DenseTarget):
    name = "edgellm-0.5"
    edgellm_version = "0.5.0"
    releases = "0.4 – 0.5"
    packed_qkv = True
    vlm_text = False  # the 0.4/0.5 runtimes hard-code the M-RoPE sections (features/vlm.py)

    def plugin_attrs(self, layer):
        # qkv_scales arrived with runtime 0.7 (FP8 KV); the 0.4/0.5 creators do not know it.
        attrs = super().plugin_attrs(layer)
        attrs.pop("qkv_scales")
        return attrs


TARGET = Edgellm05()
