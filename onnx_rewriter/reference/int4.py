"""CPU reference of ``Int4GroupwiseGemmPlugin`` (V1 bytes) and ``Int4GroupwiseGemmPluginV2`` (V2 bytes).

It reads the packed initializer as the runtime does: unpack the nibbles U, form
w = (U - 8) * scales[k // G, n] rounded to fp16, accumulate x @ w.T in fp32, return fp16. A packing
bug therefore shows up as a wrong weight, i.e. a failed ``verify``.
"""

from __future__ import annotations

import numpy as np

from onnx_rewriter.features.int4.layout import PACKERS, dequantize


def int4_gemm(x, qweight, scales, *, gemm_n: int, gemm_k: int, group_size: int, version: int) -> np.ndarray:
    if group_size <= 0 or gemm_k % group_size:
        raise ValueError(f"group_size {group_size} does not divide gemm_k {gemm_k}")
    if x.shape[-1] != gemm_k or tuple(scales.shape) != (gemm_k // group_size, gemm_n):
        raise ValueError(f"Int4 GEMM: input {x.shape} / scales {scales.shape} vs gemm_k={gemm_k}, gemm_n={gemm_n}")
    u = PACKERS[version][1](qweight, gemm_n, gemm_k)
    w = dequantize(u, scales, group_size).astype(np.float32)
    y = np.asarray(x, dtype=np.float32) @ w.T
    return y.astype(np.float16)
