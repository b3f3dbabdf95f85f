"""Activation-aware INT4 (AWQ-style): per input channel scales s that make RTN keep the channels that carry
large activations, searched on calibration activations.

y = x W = (x / s) (diag(s) W): the plugin quantizes diag(s) W and reads x / s, which the graph computes with
a `Mul(x, pre_quant_scale)` in front of the plugin (contract part 2 section 7.9; pre_quant_scale = 1 / s).
s is a power of two, so W * s, 1 / s and x / s are exact in fp16 and verify can rebuild the same weights.

The search (as AWQ): s = mean|x|^a per channel, normalised to a geometric mean of 1, for a in GRID; the a
whose quantized output is closest to x W on the calibration rows wins. a = 0 is plain RTN (s = 1), so the
chosen scales never do worse than RTN on the calibration set.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from onnx_rewriter.features.int4 import layout as int4_layout
from onnx_rewriter.modelio import stream

GRID = tuple(np.round(np.arange(0.0, 1.01, 0.125), 3))
MAX_EXP = 8  # |log2 s| <= 8: keeps x / s and W * s well inside fp16's range


def pow2_scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """s = 2^round(log2(mean|x|^alpha / geometric mean)), fp32 [K]; all ones for alpha = 0."""
    if alpha == 0:
        return np.ones(mean_abs.shape, np.float32)
    logs = alpha * np.log2(np.maximum(np.asarray(mean_abs, np.float64), 1e-8))
    logs -= logs.mean()
    return np.exp2(np.clip(np.rint(logs), -MAX_EXP, MAX_EXP)).astype(np.float32)


def quantize(w_kn: np.ndarray, s: np.ndarray):
    """RTN of diag(s) W (fp16 W; exact: s is a power of two) -> (U [N, K], scales [K/G, N])."""
    return int4_layout.rtn(scaled(w_kn, s))


def scaled(w_kn: np.ndarray, s: np.ndarray) -> np.ndarray:
    """diag(s) W in fp16 (exact: s is a power of two), what quantize() rounds."""
    return (np.asarray(w_kn, np.float16).astype(np.float32) * s[:, None]).astype(np.float16)


def quantize_packed(w_kn: np.ndarray, s: np.ndarray, version: int):
    """quantize() packed for the plugin, a block of whole groups at a time (int4_layout.rtn_packed)."""
    w = np.asarray(w_kn, np.float16)
    rows = int4_layout.block_rows(w.shape[1])
    blocks = ((k0, scaled(w[k0:k0 + rows], s[k0:k0 + rows])) for k0 in range(0, w.shape[0], rows))
    return int4_layout.rtn_packed(blocks, *w.shape, version)


def search(w_kn: np.ndarray, mean_abs: np.ndarray, x_rows: np.ndarray):
    """(s, alpha, rtn error, chosen error): errors are the relative Frobenius error of the output on x_rows."""
    w = np.asarray(w_kn, np.float16).astype(np.float32)
    x = np.asarray(x_rows, np.float32)
    ref = x @ w
    norm = max(float(np.linalg.norm(ref)), 1e-30)
    best = None
    for alpha in GRID:
        s = pow2_scales(mean_abs, float(alpha))
        err = float(np.linalg.norm((x / s) @ quantized_values(w, s) - ref)) / norm
        if best is None or err < best[2]:
            best = (s, float(alpha), err)
        if alpha == 0:
            rtn_err = err
    return best[0], best[1], rtn_err, best[2]


# onnxruntime's Cast rounds fp32 -> fp16 as numpy's astype does (round to nearest even), 15x faster: the
# search's two fp16 roundings per trial were most of AWQ's CPU time.
_CAST = stream.Caster()


def _via_fp16(a: np.ndarray) -> np.ndarray:
    """a (fp32, contiguous) rounded to fp16, back in fp32."""
    half = np.empty(a.shape, np.float16)
    _CAST(a, TensorProto.FLOAT, half, TensorProto.FLOAT16)
    _CAST(half, TensorProto.FLOAT16, a, TensorProto.FLOAT)
    return a


def quantized_values(w32: np.ndarray, s: np.ndarray) -> np.ndarray:
    """dequant(quantize(W, s)) as the plugin holds it, [K, N] fp32: the values of
    int4_layout.dequantize(*quantize(W, s)).T, computed in place in [K, N] order (no codes, no transposes)."""
    k, n = w32.shape
    g = _via_fp16(w32 * s[:, None]).reshape(k // int4_layout.GROUP, int4_layout.GROUP, n)
    s32 = int4_layout.group_scales(g.reshape(k, n)).astype(np.float32)[:, None, :]  # as int4_layout.rtn
    np.divide(g, s32, out=g)
    np.rint(g, out=g)
    np.clip(g, -8, 7, out=g)
    np.add(g, 0.0, out=g)  # -0 -> +0: the codes hold U = 8 there, which dequantizes to +0
    np.multiply(g, s32, out=g)  # (U - 8) * scale, exact in fp32, as int4_layout.dequantize
    return _via_fp16(g.reshape(k, n))
