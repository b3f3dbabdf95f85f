"""Model dimensions read off the matched graph (no HF config needed), and what the RoPE constants say."""

from __future__ import annotations

import numpy as np

from onnx_rewriter.analysis.constants import snap_theta
from onnx_rewriter.matching.results import AttentionLayer
from onnx_rewriter.modelio.graph import lazy_proto


def is_default_rope(inv_freq: np.ndarray, rotary_dim: int, theta: float) -> bool:
    expected = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    return bool(np.allclose(inv_freq, expected, rtol=1e-4, atol=0))


def runtime_rope_layer(layers: list[AttentionLayer]) -> AttentionLayer:
    """The layer whose RoPE table config.json describes (the one table the runtime builds): the first
    full-attention layer, else layer 0. Gemma3's local (windowed) layers use another theta; targets
    bake those tables into the graph (targets.base.rope_input)."""
    return next((l for l in layers if not l.sliding_window), layers[0])


def intermediate_size_of(graph, hidden_size: int, attn_width: int) -> int | None:
    """The MLP width: the row count of the [I, H] weights MatMuls read (down_proj), the most common
    one that is neither H nor the attention width (o_proj)."""
    from collections import Counter

    import onnx_graphsurgeon as gs

    rows = Counter()
    for node in graph.nodes:
        if node.op != "MatMul" or not isinstance(node.inputs[1], gs.Constant):
            continue
        proto = lazy_proto(node.inputs[1])
        shape = list(proto.dims) if proto is not None else list(node.inputs[1].shape)
        if len(shape) == 2 and shape[1] == hidden_size and shape[0] not in (hidden_size, attn_width):
            rows[int(shape[0])] += 1
    return rows.most_common(1)[0][0] if rows else None


def model_spec(layers: list[AttentionLayer], vocab_size: int, hidden_size: int, graph=None) -> dict:
    l0 = layers[0]
    ref = runtime_rope_layer(layers)
    theta, _ = snap_theta(ref.rope.inv_freq, ref.rotary_dim)  # config.json's theta replaces it in step_check
    windows = sorted({l.sliding_window for l in layers if l.sliding_window})
    spec = {
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden_size),
        "num_hidden_layers": len(layers),
        "num_attention_heads": l0.num_q_heads,
        "num_key_value_heads": l0.num_kv_heads,
        "head_dim": l0.head_size,
        "rotary_dim": l0.rotary_dim,
        "rope_theta": theta,
        "default_rope": is_default_rope(ref.rope.inv_freq, ref.rotary_dim, theta),
    }
    if windows:
        spec["sliding_window"] = windows[-1]
    if ref.rope.mrope_section:  # M-RoPE: frequency pairs per t/h/w row, as read off the graph
        spec["mrope_section"] = list(ref.rope.mrope_section)
        spec["mrope_interleaved"] = ref.rope.mrope_interleaved
    if graph is not None:
        inter = intermediate_size_of(graph, int(hidden_size), l0.num_q_heads * l0.head_size)
        if inter:
            spec["intermediate_size"] = inter
    return spec
