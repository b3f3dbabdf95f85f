"""The pattern library: one pattern per module, each exporting `PATTERN`.

Stages run in the order below, and inside a stage the patterns are tried in the order listed (the
first that matches an anchor wins). Adding a pattern is a module here with `PATTERN` plus its line
in `STAGES`.
"""

from __future__ import annotations

import importlib

STAGES = {
    "embedding": ["embedding"],  # Gather(W, input_ids) that becomes the inputs_embeds input
    "rms_norm": ["rms_norm"],  # RMSNorm cores: kept in fp32 by the dtype pass
    "qk_norm": ["qk_rmsnorm"],  # RMSNorm core times a 1-D gamma (q/k norm candidates for the 0.11 plugin)
    # cos/sin computed from positions and inv_freq; M-RoPE: picked per frequency from [3, B, S] positions
    "rope_table": ["rope_table_matmul", "rope_table_mul", "mrope_table"],
    # RoPE applied to q or k. rope_interleaved only refuses: it is tried where rotate_half failed.
    "rope": ["onnx_rotary_embedding", "rotate_half", "rope_interleaved"],
    "rope_partial": ["partial_rotary"],  # rope over the first R dims, the rest passed through
    "kv_cache": ["kv_cache_concat"],  # Concat(past_key_values input, new k/v) -> present output
    "repeat_kv": ["repeat_kv"],  # GQA head expansion
    "k_transpose": ["k_transpose_3d", "k_transpose_4d"],  # k^T: one 4-D Transpose or a 3-D sandwich
    "attention_core": ["attention_core", "onnx_attention_core"],  # softmax(q k^T * s + mask) v
    "attention_layer": ["attention_layer"],  # the whole layer: projections' outputs in, attention output out
    "moe": ["moe_block"],  # a routed MoE block (router Softmax -> TopK -> experts): features/moe writes its plugin
}

# Vision encoders (onnx_rewriter/vision/): a separate library, run only on vision-tower exports.
VISION_STAGES = {
    "vit_rope": ["vit_rope"],  # x·cos + rotate_half(x)·sin with cos/sin = Cos/Sin(Concat(a, a)) on [T, H, D]
    "vit_attention": ["vit_attention"],  # softmax(q k^T * s + mask) v over [T, H, D], q/k through vit_rope
}


def load_patterns(stages: dict = STAGES) -> list:
    """Every pattern of `stages` (the decoder library by default), stage by stage in the declared order."""
    pats = []
    for stage, modules in stages.items():
        for name in modules:
            pat = importlib.import_module(f"{__name__}.{name}").PATTERN
            assert pat.stage == stage, f"{name}: declares stage {pat.stage}, listed under {stage}"
            pats.append(pat)
    return pats
