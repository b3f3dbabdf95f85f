"""numpy ViTAttentionPlugin: bidirectional softmax attention inside each `cu_seqlens` segment.

q, k, v [T, H, D] (RoPE already applied by the graph), cu_seqlens int32 [B+1] (0, ..., T),
max_seqlen_carrier [Lmax] read for its length only. Output [T, H, D] in q's dtype; fp32 inside.
"""

from __future__ import annotations

import numpy as np


def vit_attention(q, k, v, cu_seqlens, max_seqlen_carrier, *, num_heads: int, head_size: int,
                  attention_scale: float | None = None) -> np.ndarray:
    q, k, v = (np.asarray(x) for x in (q, k, v))
    if q.ndim != 3 or q.shape[1:] != (num_heads, head_size) or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"ViTAttentionPlugin: q/k/v must be [T, {num_heads}, {head_size}], "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    cu = np.asarray(cu_seqlens).astype(np.int64).reshape(-1)
    if cu.size < 2 or cu[0] != 0 or cu[-1] != q.shape[0] or np.any(np.diff(cu) < 0):
        raise ValueError(f"ViTAttentionPlugin: cu_seqlens {cu.tolist()} do not split {q.shape[0]} tokens")
    longest = int(np.diff(cu).max())
    if longest > np.asarray(max_seqlen_carrier).shape[0]:
        raise ValueError(f"ViTAttentionPlugin: a segment of {longest} tokens exceeds max_seqlen_carrier "
                         f"[{np.asarray(max_seqlen_carrier).shape[0]}]")
    scale = float(attention_scale) if attention_scale is not None else head_size ** -0.5
    qf, kf, vf = (x.astype(np.float32) for x in (q, k, v))
    out = np.zeros(q.shape, dtype=np.float32)
    for start, end in zip(cu[:-1], cu[1:]):
        scores = np.einsum("thd,shd->hts", qf[start:end], kf[start:end]) * np.float32(scale)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        out[start:end] = np.einsum("hts,shd->thd", probs, vf[start:end])
    return out.astype(q.dtype)
