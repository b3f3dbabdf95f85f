"""The FP8 (E4M3) KV cache as the runtime stores it (contract-2 section 8): scales are quant->orig, the
cache holds fp8(x / scale) and attention reads fp8 * scale. The runtime converts with saturation to the
largest finite E4M3 value (448); ml_dtypes' cast would give NaN past it, so values are clipped first."""

from __future__ import annotations

import ml_dtypes
import numpy as np

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = 448.0


def encode(x, scale: float) -> np.ndarray:
    """What the cache stores for fp32/fp16 values `x` under a quant->orig `scale`."""
    y = np.asarray(x, dtype=np.float32) / np.float32(scale)
    return np.clip(y, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def decode(x, scale: float) -> np.ndarray:
    """What attention reads back from cache entries `x` (E4M3)."""
    return np.asarray(x).astype(np.float32) * np.float32(scale)


def round_trip(x, scale: float) -> np.ndarray:
    return decode(encode(x, scale), scale)
