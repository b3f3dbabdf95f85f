"""MoE expert weight bytes for EdgeLLM's MoE plugins (contract part 3 §15.4; docs/contract.md, "MoE").

Write side; the CPU reference (reference/moe.py) reads the same bytes back through its own unpackers,
written from the same description, and tests pin both to NVIDIA's SHA-256 test vectors.

- ``pack_marlin(U)``: one expert's biased nibbles U[N, K] in [0, 15] (n = output channel, k = input channel)
  -> int8 [K/16, 8N], the Marlin layout of ``Int4MoePlugin`` (uint32 words, little-endian).
- ``pack_marlin_scales(S)``: fp16 scales[K/G, N] (group g, output n) -> the stored fp16 [K/G, N], permuted.
- ``int4_fc1(gate, up)`` / ``fp16_fc1(gate, up)``: FC1's rows per plugin. They differ, and a wrong order is
  silently wrong: Int4MoePlugin ``[gate; up]``, Fp16MoePlugin 64-row blocks starting with up.
- ``expert_codes``: a GPTQ / AutoAWQ expert linear (features/int4/checkpoint.py ``read``) -> (U, scales)
  exactly, or the reason it cannot be expressed (act-order, a zero point that does not fit a nibble).
"""

from __future__ import annotations

import numpy as np

from onnx_rewriter.reference.moe import FP16_INTERLEAVE, marlin_index, marlin_scale_perm


def pack_marlin(u: np.ndarray) -> np.ndarray:
    """U[N, K] (nibbles in [0, 15]; N % 64 == 0, K % 16 == 0) -> int8 [K/16, 8N]."""
    u = np.asarray(u)
    if u.ndim != 2 or u.min(initial=0) < 0 or u.max(initial=0) > 15:
        raise ValueError("U must be a 2-D array of nibbles in [0, 15]")
    n, k = u.shape
    col, fields = marlin_index(n, k)
    u32 = u.astype(np.uint32)
    acc = np.zeros(col.shape, dtype=np.uint32)
    for i, (ni, ki) in enumerate(fields):
        acc |= u32[ni, ki] << np.uint32(4 * i)
    words = np.zeros((k // 16, 2 * n), dtype=np.uint32)
    kt = np.arange(k // 16)[:, None, None] + 0 * col
    words[kt, col] = acc
    return np.ascontiguousarray(words.astype("<u4")).view(np.int8).reshape(k // 16, 8 * n)


def pack_marlin_scales(scales: np.ndarray) -> np.ndarray:
    """fp16 [K/G, N] (row = group, column = output channel) -> the stored, permuted fp16 [K/G, N] (a copy)."""
    s = np.asarray(scales, dtype=np.float16)
    groups, n = s.shape
    return s.reshape(-1)[marlin_scale_perm(groups, n)].reshape(groups, n).copy()


def int4_fc1(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Int4MoePlugin FC1 rows: [gate(I); up(I)] along axis -2 (gate/up [..., I, H])."""
    return np.concatenate([gate, up], axis=-2)


def fp16_fc1(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Fp16MoePlugin fc1_weights: [up[0:64], gate[0:64], up[64:128], gate[64:128], ...] along axis -2."""
    gate, up = np.asarray(gate), np.asarray(up)
    *lead, inter, h = gate.shape
    b = FP16_INTERLEAVE
    if up.shape != gate.shape or inter % b:
        raise ValueError(f"Fp16MoePlugin FC1: gate {gate.shape} / up {up.shape}, I must be a multiple of {b}")
    blocks = np.stack([up.reshape(*lead, inter // b, b, h), gate.reshape(*lead, inter // b, b, h)], axis=-3)
    return blocks.reshape(*lead, 2 * inter, h)


def pack_int4_experts(us: list, scales: list) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert U[N, K] and fp16 scales[K/G, N] -> (int8 [E, K/16, 8N], fp16 [E, K/G, N]) as the plugin reads them."""
    return (np.stack([pack_marlin(u) for u in us]), np.stack([pack_marlin_scales(s) for s in scales]))


def expert_codes(linear, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A decoded GPTQ / AutoAWQ linear (q [K, N], actual zeros z [K/G, N], fp16 scales, g_idx) -> (U[N, K], scales).

    Exact or refused: the plugin computes (U - 8) * s and has neither a zero-point nor an act-order input, so
    U = q - z + 8 must fit a nibble for every weight (NVIDIA clips it, changing weights) and g_idx must be
    k // G (NVIDIA ignores it). Raises ValueError naming `where` otherwise."""
    k = linear.q.shape[0]
    if not np.array_equal(np.asarray(linear.g_idx), np.arange(k) // linear.group):
        raise ValueError(f"{where}: act-order g_idx (desc_act): the Int4MoePlugin takes no input permutation")
    u = linear.q - linear.z[np.arange(k) // linear.group] + 8
    if u.min() < 0 or u.max() > 15:
        bad = int(((u < 0) | (u > 15)).sum())
        raise ValueError(f"{where}: {bad} weights have q - zero + 8 outside [0, 15]; the Int4MoePlugin has no "
                         f"zero-point input, so this asymmetric expert cannot be written exactly")
    return u.T.astype(np.uint8), np.asarray(linear.scales, dtype=np.float16)
