"""CPU reference of ``Int4GroupwiseGemmPlugin`` (V1 bytes) and ``Int4GroupwiseGemmPluginV2`` (V2 bytes).

It reads the packed initializer as the runtime does: unpack the nibbles U, form
w = (U - 8) * scales[k // G, n] rounded to fp16, accumulate x @ w.T in fp32, return fp16. A packing
bug therefore shows up as a wrong weight, i.e. a failed ``verify``.

The read side of the byte layouts lives here (features/int4/layout.py packs them): U[N, K] is the biased
nibble in [0, 15] of output channel n, input channel k.
- V1 ("AWQ swizzle", every target): int8 [N/2, K]. Inside each 32-wide K block, position i holds
  source column P[i] = 8*(i % 4) + i // 4; then each 4x64 block of rows is flattened row-major into
  64 little-endian int16 words of four nibbles.
- V2 (cuteDSL fragment, edgellm-0.11): int8 [ceil(N/128)*ceil(K/64)*8, 512], padded with nibble 8
  (dequantizes to 0); each uint32 word holds 8 nibbles of two rows 32 apart (`_v2_index`).
"""

from __future__ import annotations

import numpy as np

GROUP = 128


# V1: output position i of a 32-wide K block takes source column _P[i].
_P = np.array([8 * (i % 4) + i // 4 for i in range(32)], dtype=np.int64)


def _v1_src(k: int) -> np.ndarray:
    """Source column of each packed K position (the permutation inside every 32-wide block)."""
    kk = np.arange(k, dtype=np.int64)
    return 32 * (kk // 32) + _P[kk % 32]


def unpack_v1(qweight: np.ndarray, n: int, k: int) -> np.ndarray:
    """int8 [N/2, K] -> U[N, K]: each byte pair is one little-endian word of four nibbles."""
    b = np.ascontiguousarray(np.asarray(qweight, dtype=np.int8)).view(np.uint8)
    if b.shape != (n // 2, k):
        raise ValueError(f"V1 qweight has shape {b.shape}, expected {(n // 2, k)}")
    words = b.reshape(n // 4, 2 * k).view("<u2").astype(np.uint16)  # [N/4, K]: word w = 64*kb + g
    nib = (words[..., None] >> np.array([0, 4, 8, 12], dtype=np.uint16)) & 0xF  # [N/4, K, 4]
    # word g of block kb holds row g // 16, columns 4*(g % 16) + 0..3 of U' (a row-major 4x64 block)
    up = nib.reshape(n // 4, k // 64, 4, 64).transpose(0, 2, 1, 3).reshape(n, k)
    u = np.empty((n, k), dtype=np.uint8)
    u[:, _v1_src(k)] = up
    return u


def _v2_index(n: int, k: int):
    """(row, lane, [8 (n, k) index pairs]) of every V2 word, in bit order [3:0], [7:4], ..., [31:28]."""
    nb, kt = -(-n // 128), -(-k // 64)
    b, t, kbl, p, lane = np.ix_(np.arange(nb), np.arange(kt), np.arange(4), np.arange(2), np.arange(128))
    row = (b * kt + t) * 8 + kbl * 2 + p + 0 * lane
    n_lo = 128 * b + lane // 4 + 64 * p + 0 * t + 0 * kbl
    n_hi = n_lo + 32
    k0 = 64 * t + 16 * kbl + 2 * (lane % 4) + 0 * b + 0 * p
    fields = [(n_lo, k0), (n_lo, k0 + 8), (n_hi, k0), (n_hi, k0 + 8),
              (n_lo, k0 + 1), (n_lo, k0 + 9), (n_hi, k0 + 1), (n_hi, k0 + 9)]
    return row, lane + 0 * row, fields, (nb * 128, kt * 64), nb * kt * 8


def unpack_v2(qweight: np.ndarray, n: int, k: int) -> np.ndarray:
    """int8 [rows, 512] -> U[N, K] (the padding is dropped)."""
    row, lane, fields, padded, rows = _v2_index(n, k)
    b = np.ascontiguousarray(np.asarray(qweight, dtype=np.int8))
    if b.shape != (rows, 512):
        raise ValueError(f"V2 qweight has shape {b.shape}, expected {(rows, 512)}")
    words = b.view("<u4").astype(np.uint32)[row, lane]
    bm = np.zeros(padded, dtype=np.uint8)
    for j, (ni, ki) in enumerate(fields):
        bm[ni, ki] = (words >> np.uint32(4 * j)) & 0xF
    return bm[:n, :k]


def dequantize(u: np.ndarray, scales: np.ndarray, group: int = GROUP) -> np.ndarray:
    """w[N, K] in fp16 exactly as the runtime forms it: (U - 8) * scales[k // G, n], rounded to fp16."""
    s = np.asarray(scales, dtype=np.float16)
    per_k = np.repeat(s, group, axis=0)[: u.shape[1]].T.astype(np.float32)  # [N, K]
    return ((u.astype(np.float32) - 8.0) * per_k).astype(np.float16)


UNPACKERS = {1: unpack_v1, 2: unpack_v2}


def int4_gemm(x, qweight, scales, *, gemm_n: int, gemm_k: int, group_size: int, version: int) -> np.ndarray:
    if group_size <= 0 or gemm_k % group_size:
        raise ValueError(f"group_size {group_size} does not divide gemm_k {gemm_k}")
    if x.shape[-1] != gemm_k or tuple(scales.shape) != (gemm_k // group_size, gemm_n):
        raise ValueError(f"Int4 GEMM: input {x.shape} / scales {scales.shape} vs gemm_k={gemm_k}, gemm_n={gemm_n}")
    u = UNPACKERS[version](qweight, gemm_n, gemm_k)
    w = dequantize(u, scales, group_size).astype(np.float32)
    y = np.asarray(x, dtype=np.float32) @ w.T
    return y.astype(np.float16)
