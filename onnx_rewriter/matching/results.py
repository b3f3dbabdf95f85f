"""What the patterns hand to the targets: target-agnostic descriptions of matched subgraphs.

Every stage's match result is one of these (`Match.result`), in stage order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs


@dataclass
class TokenEmbedding:
    """Gather(weight[V, H], ids) on axis 0: the lookup the runtime does itself (inputs_embeds)."""

    weight: gs.Constant
    ids: gs.Tensor  # a graph input


@dataclass
class RMSNormCore:
    """x * rsqrt(mean(x²) + eps), the gamma Mul excluded; the dtype pass keeps `nodes` in fp32."""

    x: gs.Tensor  # input (before any Cast)
    out: gs.Tensor
    eps: float
    nodes: list  # the nodes computing `out` from x


def mrope_axes(sections, interleaved: bool, half: int) -> np.ndarray:
    """Per frequency pair i < R/2, the position row (0 t, 1 h, 2 w) an M-RoPE table reads, as the runtime
    picks it from `mrope_section` [sT, sH, sW]: non-interleaved (Qwen2/2.5-VL) t, then h for sH pairs,
    then w; interleaved (Qwen3-VL) h where i % 3 == 1 and i < 3·sH, w where i % 3 == 2 and i < 3·sW."""
    _, s_h, s_w = (int(s) for s in sections)
    i = np.arange(half)
    if interleaved:
        return np.where((i % 3 == 1) & (i < 3 * s_h), 1, np.where((i % 3 == 2) & (i < 3 * s_w), 2, 0))
    return np.where(i < half - s_h - s_w, 0, np.where(i < half - s_w, 1, 2))


@dataclass
class RopeTable:
    """cos/sin computed from positions and an inv_freq constant, shared by the layers that use it."""

    inv_freq: np.ndarray  # [R/2]
    positions: gs.Tensor  # the tensor the angles are computed from
    cos: gs.Tensor
    sin: gs.Tensor
    attention_scaling: float = 1.0
    # M-RoPE (Qwen2.5-VL / Qwen3-VL): positions are [3, B, S] (t, h, w) and frequency pair i reads one of
    # the rows; sections [sT, sH, sW] in HF's mrope_section terms, interleaved as Qwen3-VL does.
    mrope_section: list[int] | None = None
    mrope_interleaved: bool = False


@dataclass
class RopeApply:
    """rotate_half RoPE applied to `x` ([B, H, S, D] layout) over its first `rotary_dim` dims."""

    x: gs.Tensor
    table: RopeTable
    rotary_dim: int
    patterns: list[str] = field(default_factory=list)


@dataclass
class RepeatKV:
    x: gs.Tensor  # [B, Hkv, T, D]
    groups: int | None


@dataclass
class KTranspose:
    """k^T ([B, H, D, T]) computed from `k` ([B, H, T, D])."""

    k: gs.Tensor


@dataclass
class KVCacheConcat:
    """present = Concat(past, new) of an export that carries its own KV cache; the plugin replaces it."""

    past: gs.Tensor  # graph input [B, Hkv, P, D]
    new: gs.Tensor  # this call's k (roped) or v [B, Hkv, S, D]
    present: gs.Tensor  # graph output [B, Hkv, P+S, D]


@dataclass
class AttentionCore:
    """softmax(q·kᵀ·scale + mask)·v with q, k, v in [B, H, S, D]; `out` is [B, Hq, S, D]."""

    q: gs.Tensor
    k: gs.Tensor
    v: gs.Tensor
    out: gs.Tensor
    scale: float
    mask: gs.Tensor | None


@dataclass
class QKNorm:
    """Per-head RMSNorm on q or k before RoPE (Qwen3, Gemma3); stays in the graph for 0.5/0.9.

    Targets whose plugin normalizes (0.11) read `x`, the tensor entering the norm, and the gamma
    `weight` (the effective multiplier, e.g. Gemma's 1 + w); `layout` is x's layout: "bshd" (Qwen3,
    norm before the head transpose) or "bhsd" (Gemma3, after it).
    """

    weight: np.ndarray | None
    eps: float | None
    x: gs.Tensor | None = None
    layout: str = "bshd"


@dataclass
class AttentionLayer:
    """One decoder layer's attention, ready for a target to replace with its plugin node.

    q, k, v are the tensors entering RoPE / attention in [B, H, S, D] layout (q and k before RoPE).
    The target must produce a tensor equivalent to `out` ([B, Hq, S, D]) and rebind its consumers.
    """

    index: int
    q: gs.Tensor
    k: gs.Tensor
    v: gs.Tensor
    out: gs.Tensor
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    rotary_dim: int
    rope: RopeTable
    scale: float
    mask: gs.Tensor | None
    sliding_window: int | None = None
    q_norm: QKNorm | None = None
    k_norm: QKNorm | None = None
    patterns: list[str] = field(default_factory=list)
    # (tensor the rewrite removes, tensor of the very same shape that stays): TorchScript reads batch and
    # sequence sizes off roped q/k through Shape side branches; those Shapes are moved to the stayer.
    same_shape: list[tuple[gs.Tensor, gs.Tensor]] = field(default_factory=list)
    # name of q / k / v / a q-k norm input -> the flat [B, S, H·D] tensor it is a pure view of (projections.py)
    views: dict[str, gs.Tensor] = field(default_factory=dict)

    @property
    def default_scale(self) -> float:
        return float(self.head_size) ** -0.5


@dataclass
class VitRope:
    """Vision-tower RoPE over the whole head: x·cos + rotate_half(x)·sin, cos/sin = Cos/Sin(Concat(a, a)),
    `angles` the per-patch angles (the `rotary_pos_emb` input, maybe permuted into window order)."""

    x: gs.Tensor  # [T, H, D]
    out: gs.Tensor
    angles: gs.Tensor  # [T, D/2]
    head_size: int


@dataclass
class VitAttention:
    """One vision block's bidirectional attention: softmax(q k^T * scale + mask) v over [T, H, D] tensors,
    q and k rotated by the same `VitRope` tables; `mask` an additive [T, T] segment mask (probed later)."""

    q: gs.Tensor  # [T, H, D], after RoPE: the plugin's inputs
    k: gs.Tensor
    v: gs.Tensor
    out: gs.Tensor  # [T, H, D]
    mask: gs.Tensor
    scale: float
    num_heads: int | None
    head_size: int


@dataclass
class MoeBlock:
    """A routed Mixture-of-Experts block as transformers' `batched_mm` export computes it (docs/contract.md,
    "Mixture-of-Experts decoders"): router logits = x @ router^T, softmax, top-k (renormalized or not), each
    chosen expert's SwiGLU (gate rows first in `gate_up`), weighted and summed over the k choices."""

    x: gs.Tensor  # [T, H]: the tokens the router and the experts read
    router_logits: gs.Tensor  # [T, E], the router GEMM's output (before the Softmax)
    router: gs.Constant  # the router weight, [E, H] (Gemm transB=1) or [H, E] (MatMul)
    gate_up: gs.Constant  # [E, 2I, H]: rows 0..I-1 gate, I..2I-1 up (HF's chunk(2) order)
    down: gs.Constant  # [E, H, I]
    experts: int
    top_k: int
    inter: int  # I (moe_intermediate_size)
    hidden: int  # H
    renormalize: bool  # top-k weights divided by their sum (norm_topk_prob)
    out: gs.Tensor  # [T, H]: the weighted sum over the k choices
