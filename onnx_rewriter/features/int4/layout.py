"""INT4 weight bytes the EdgeLLM `Int4GroupwiseGemmPlugin` (V1) and `...V2` read, and groupwise RTN.

Everything works on U[N, K], the *biased nibble* in [0, 15] of output channel n, input channel k: the
runtime computes w[n, k] = (U[n, k] - 8) * scales[k // G, n] (fp16) and y = x @ w.T
(docs/architecture.md, "INT4 weight-only linears").

- V1 ("AWQ swizzle", every target): int8 [N/2, K]. Inside each 32-wide K block, position i holds
  source column P[i] = 8*(i % 4) + i // 4; then each 4x64 block of rows is flattened row-major into
  64 little-endian int16 words of four nibbles.
- V2 (cuteDSL fragment, edgellm-0.11): int8 [ceil(N/128)*ceil(K/64)*8, 512], padded with nibble 8
  (dequantizes to 0); each uint32 word holds 8 nibbles of two rows 32 apart (`_v2_index`).

The unpackers (reference/int4.py, re-exported here) are written from the same byte-level description, so
the CPU reference reads the bytes the way the runtime does; tests pin the packers to NVIDIA's own byte vectors.
"""

from __future__ import annotations

import numpy as np

from onnx_rewriter.reference.int4 import GROUP, _v1_src, _v2_index, dequantize, unpack_v1, unpack_v2  # noqa: F401


def _check_u(u: np.ndarray) -> np.ndarray:
    u = np.asarray(u)
    if u.ndim != 2 or u.min(initial=0) < 0 or u.max(initial=0) > 15:
        raise ValueError("U must be a 2-D array of nibbles in [0, 15]")
    return u.astype(np.uint16)


def pack_v1(u: np.ndarray) -> np.ndarray:
    """U[N, K] -> int8 [N/2, K] (needs N % 4 == 0 and K % 64 == 0)."""
    u = _check_u(u)
    n, k = u.shape
    if n % 4 or k % 64:
        raise ValueError(f"V1 packing needs N % 4 == 0 and K % 64 == 0 (N={n}, K={k})")
    up = u[:, _v1_src(k)]  # U'
    tuples = up.reshape(n // 4, 4, k // 64, 64).transpose(0, 2, 1, 3).reshape(n // 4, k // 64, 64, 4)
    words = tuples[..., 0] | tuples[..., 1] << 4 | tuples[..., 2] << 8 | tuples[..., 3] << 12
    return np.ascontiguousarray(words.reshape(n // 4, k).astype("<u2")).view(np.int8).reshape(n // 2, k)


def pack_v2(u: np.ndarray) -> np.ndarray:
    """U[N, K] -> int8 [ceil(N/128)*ceil(K/64)*8, 512] (padding nibbles are 8)."""
    u = _check_u(u)
    n, k = u.shape
    row, lane, fields, padded, rows = _v2_index(n, k)
    bm = np.full(padded, 8, dtype=np.uint32)
    bm[:n, :k] = u
    words = np.zeros((rows, 128), dtype=np.uint32)
    acc = np.zeros(row.shape, dtype=np.uint32)
    for j, (ni, ki) in enumerate(fields):
        acc |= bm[ni, ki] << np.uint32(4 * j)
    words[row, lane] = acc
    return np.ascontiguousarray(words.astype("<u4")).view(np.int8).reshape(rows, 512)


PACKERS = {1: (pack_v1, unpack_v1), 2: (pack_v2, unpack_v2)}


def rtn(w_kn: np.ndarray, group: int = GROUP) -> tuple[np.ndarray, np.ndarray]:
    """Groupwise symmetric round-to-nearest of a MatMul weight [K, N] -> (U[N, K] uint8, scales fp16 [K/G, N]).

    s = max|W_group| / 7 rounded to fp16 (an all-zero group gets s = 1: its codes are 0 either way);
    q = clip(round(W / s), -8, 7) with the fp16 scale the runtime multiplies by; U = q + 8.
    """
    w = np.asarray(w_kn, dtype=np.float32)
    k, n = w.shape
    g = w.reshape(k // group, group, n)
    s = group_scales(w, group)
    q = np.clip(np.rint(g / s.astype(np.float32)[:, None, :]), -8, 7).reshape(k, n)
    return (q.T + 8).astype(np.uint8), s


def group_scales(w_kn: np.ndarray, group: int = GROUP) -> np.ndarray:
    """rtn's scales alone, fp16 [K/G, N]: max|W_group| / 7, 1 for an all-zero group."""
    w = np.asarray(w_kn, dtype=np.float32)
    s = (np.abs(w.reshape(w.shape[0] // group, group, w.shape[1])).max(axis=1) / 7.0).astype(np.float16)
    s[s == 0] = 1.0
    return s


# ---------------------------------------------------------------- quantizing in bounded blocks

# fp32 bytes of weight quantized at once: RTN and packing make several temporaries of a block, so a whole
# 8960 x 1536 matrix at once cost 600 MB of peak (bench/README.md); a block of whole groups costs ~25 MB.
BLOCK_BYTES = 4 << 20


def block_rows(n: int, group: int = GROUP) -> int:
    """Input channels (rows of the [K, N] weight) per block: whole groups, about BLOCK_BYTES of fp32."""
    return max(group, BLOCK_BYTES // (4 * n) // group * group)


def packed_shape(n: int, k: int, version: int) -> tuple[int, int]:
    return (n // 2, k) if version == 1 else (-(-n // 128) * -(-k // 64) * 8, 512)


def _place(out: np.ndarray, packed: np.ndarray, k0: int, kb: int, n: int, k: int, version: int) -> None:
    """Put the packed bytes of U[:, k0:k0+kb] (kb a multiple of 64) where pack(U) has them.

    V1: the int16 words of row block r are [N/4, K], word 64*kb' + g inside K block kb': columns of words.
    V2: row (b*kt + t)*8 + j holds K tile t of N block b: tiles t0.. of every N block."""
    if version == 1:
        out.view("<u2").reshape(n // 4, k)[:, k0:k0 + kb] = packed.view("<u2").reshape(n // 4, kb)
    else:
        nb, t0, tb = -(-n // 128), k0 // 64, kb // 64
        out.reshape(nb, k // 64 * 8, 512)[:, t0 * 8:(t0 + tb) * 8] = packed.reshape(nb, tb * 8, 512)


def rtn_packed(blocks, k: int, n: int, version: int, group: int = GROUP) -> tuple[np.ndarray, np.ndarray]:
    """RTN and packing of a [K, N] weight read as row blocks `(k0, w[k0:k0+kb])` (fp16, whole groups, kb a
    multiple of 64) -> (qweight, scales [K/G, N]), byte for byte PACKERS[version][0](rtn(w)) and rtn's scales
    (RTN is per group, packing per 64-wide K tile), with the temporaries of one block only."""
    pack = PACKERS[version][0]
    out = np.empty(packed_shape(n, k, version), np.int8)
    scales = np.empty((k // group, n), np.float16)
    done = 0
    for k0, wb in blocks:
        kb = wb.shape[0]
        if k0 != done or kb % group or wb.shape[1] != n:
            raise ValueError(f"rtn_packed: block at row {k0} of shape {wb.shape} does not continue a [{k}, {n}] "
                             f"weight in whole groups")
        u, s = rtn(wb, group)
        scales[k0 // group:(k0 + kb) // group] = s
        _place(out, pack(u), k0, kb, n, k, version)
        done += kb
    if done != k:
        raise ValueError(f"rtn_packed: blocks cover {done} of {k} rows")
    return out, scales
