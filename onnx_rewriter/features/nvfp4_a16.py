"""The bytes of ``trt_edgellm::Nvfp4A16GemmPlugin`` from a ModelOpt W4A16_NVFP4 linear (contract part 3 16.5).

Write side; reference/nvfp4_a16.py reads them back from its own description, and tests pin both to NVIDIA's
``repack_nvfp4_a16_marlin_linear`` (tensorrt-edgellm 0.11.0) byte for byte.

- ``qweights``: the checkpoint's E2M1 codes, N zero-padded to N_p (a multiple of 128), in 15.4's Marlin INT4
  layout (``features/moe/layout.pack_marlin``; the codes as they are, no zero-point bias);
- ``block_scales``: the checkpoint's E4M3 bytes, zero-padded, S^T with each 64-column block permuted (column m at
  8 (m mod 8) + swap2(m // 8), not 15.4's fp16 scale order);
- ``global_scale``: fp16(weight_scale_2 * 2^7) (the product in float64, as NVIDIA), refused where fp16 cannot
  hold it as a normal number.
"""

from __future__ import annotations

import numpy as np

from onnx_rewriter.features.moe.layout import pack_marlin
from onnx_rewriter.reference import wa_codecs

OP = "Nvfp4A16GemmPlugin"
N_ALIGN, K_ALIGN, BLOCK = 128, 64, 16
SHIFT = 2.0 ** 7  # the kernel's E2M1 / E4M3 bit moves leave the product 2^7 small (reference/nvfp4_a16.py)
_FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)
# codes packed at a time: Marlin's index arrays take ~17 bytes a code (a 1536 x 8960 MLP weight at once: ~230 MB)
PACK_CODES = 1 << 20


def padded(n: int) -> int:
    return -(-n // N_ALIGN) * N_ALIGN


def refusal(module: str, n: int, k: int, weight_scale_2) -> str | None:
    """Why this linear cannot be the plugin, or None: gemm_k % 64 (the plugin's own check) and a global scale
    fp16 holds (an overflow, or a subnormal / zero that changes every weight of the linear)."""
    if k % K_ALIGN:
        return f"{module}: {OP} needs K % {K_ALIGN} == 0 (the plugin's own check), K = {k}"
    g = global_scale(weight_scale_2)[0]
    if not np.isfinite(g) or abs(float(g)) < _FP16_MIN_NORMAL:
        return (f"{module}: {OP}'s fp16 global scale weight_scale_2 * 2^7 = "
                f"{float(np.float32(weight_scale_2).reshape(-1)[0]) * SHIFT:.6g} is "
                f"{'past fp16' if not np.isfinite(g) else 'below fp16 normals'}; the runtime would change its weights")
    return None


def global_scale(weight_scale_2) -> np.ndarray:
    """fp16 [1] = fp16(float64(weight_scale_2) * 2^7)."""
    with np.errstate(over="ignore"):
        return np.array([np.float64(np.asarray(weight_scale_2, np.float32).reshape(-1)[0]) * SHIFT], np.float16)


def pack_block_scales(scale_bytes: np.ndarray, n_p: int) -> np.ndarray:
    """uint8 E4M3 [N, K/16] -> int8 [1, K/16, N_p]: zero rows past N, column m stored at its permuted place."""
    n, groups = scale_bytes.shape
    padded_s = np.zeros((n_p, groups), np.uint8)
    padded_s[:n] = scale_bytes
    m = np.arange(n_p)
    r = (m % 64) // 8
    place = m - m % 64 + 8 * (m % 8) + ((r & 4) | ((r & 1) << 1) | ((r >> 1) & 1))
    out = np.empty((groups, n_p), np.uint8)
    out[:, place] = padded_s.T
    return out.view(np.int8)[None]


def pack(weight: np.ndarray, scale_bytes: np.ndarray, weight_scale_2) -> tuple:
    """Checkpoint tensors (uint8 [N, K/2] two codes a byte, low nibble = even k; uint8 [N, K/16]; fp32 scalar) ->
    (qweights int8 [1, K/16, 8 N_p], block_scales int8 [1, K/16, N_p], global_scale fp16 [1])."""
    codes = wa_codecs.unpack_fp4(np.asarray(weight, np.uint8))
    n, k = codes.shape
    n_p = padded(n)
    full = np.zeros((n_p, k), np.uint8)
    full[:n] = codes
    # a row of Marlin words (16 input channels) depends on those 16 channels only: pack slices of K
    step = max(16, PACK_CODES // n_p // 16 * 16)
    qweights = np.concatenate([pack_marlin(full[:, k0:k0 + step]) for k0 in range(0, k, step)])
    return qweights[None], pack_block_scales(np.asarray(scale_bytes, np.uint8), n_p), global_scale(
        weight_scale_2)
