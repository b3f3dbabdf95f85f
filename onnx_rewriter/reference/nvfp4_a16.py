"""CPU reference of ``trt_edgellm::Nvfp4A16GemmPlugin``, NVFP4 weight-only (contract part 3 16.5; docs/contract.md,
"NVFP4-A16").

Read side: the bytes are unpacked here from their own description, never through the packer
(features/nvfp4_a16.py); tests pin both to NVIDIA's ``repack_nvfp4_a16_marlin_linear`` (0.11.0 wheel).

- ``qweights`` int8 ``[1, K/16, 8 N_p]``: the E2M1 codes (sign bit 3) in the Marlin INT4 layout of 15.4
  (``reference.moe.unpack_marlin``), no zero-point bias.
- ``block_scales`` int8 ``[1, K/16, N_p]``: the E4M3 bytes, S^T [K/16, N_p] with each 64-column block permuted:
  column m is stored at 8 (m mod 8) + swap2(m // 8), swap2 exchanging the two low bits (NVIDIA's
  ``_nvfp4_marlin_e4m3_scale_perm``, "recovered against the on-device kernel"). This is *not* 15.4's fp16 scale
  permutation (position 8a + b <- a + 8b), which the contract's words "Marlin scale order" suggest.
- ``global_scale`` fp16 ``[1]`` = fp16(weight_scale_2 * 2^7). The kernel turns E2M1 and E4M3 into fp16 by moving
  their bits (no exponent re-bias), which leaves the product 2^7 too small; the global scale carries it back
  *(inference from NVIDIA's comment "skip-flop": 2^(15 - 8) for fp16's exponent bias)*.

Math: out = x W^T, W[n, k] = e2m1(code) * e4m3(block_scale[n, k // 16]) * (global_scale / 2^7), exact in fp32
(2 + 4 + 11 significant bits); fp16 x, fp32 accumulation, fp16 out. Where the kernel applies the global scale (to
the weight or to the fp32 sum) is not visible from the ONNX side; both agree to fp32 rounding *(inference)*.
"""

from __future__ import annotations

import numpy as np

from . import wa_codecs
from .moe import unpack_marlin

BLOCK = 16  # NVFP4 block along K
N_ALIGN = 128  # gemm_n % 128 (the plugin's own check)
K_ALIGN = 64  # gemm_k % 64 (the plugin's own check)
GLOBAL_SCALE_SHIFT = 2.0 ** 7


def scale_position(n: int) -> np.ndarray:
    """Storage column of each output column m in [0, n) of one K-block row of ``block_scales``."""
    if n % 64:
        raise ValueError(f"Nvfp4A16GemmPlugin block scales: N = {n} is not a multiple of 64")
    m = np.arange(n)
    r, c = (m % 64) // 8, m % 8
    swapped = (r & 4) | ((r & 1) << 1) | ((r >> 1) & 1)
    return m - m % 64 + 8 * c + swapped


def unpack(qweights, block_scales, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(E2M1 codes uint8 [N, K], E4M3 block-scale bytes uint8 [N, K/16]) of the plugin's two weight inputs."""
    q, s = np.asarray(qweights), np.asarray(block_scales)
    if (q.dtype != np.int8 or s.dtype != np.int8 or q.shape != (1, k // 16, 8 * n)
            or s.shape != (1, k // BLOCK, n)):
        raise ValueError(f"Nvfp4A16GemmPlugin: qweights {q.shape} / block_scales {np.shape(block_scales)} vs "
                         f"gemm_n={n}, gemm_k={k}")
    codes = unpack_marlin(q[0], n, k)
    scales = s[0].view(np.uint8)[:, scale_position(n)].T.copy()  # [N, K/16]
    return codes, scales


def dequantize(codes, scale_bytes, global_scale) -> np.ndarray:
    """W [N, K] fp32: e2m1(code) * e4m3(scale byte of its 16-block) * (fp16 global_scale / 2^7), exact."""
    g = np.float64(np.asarray(global_scale, dtype=np.float16).reshape(-1)[0]) / GLOBAL_SCALE_SHIFT
    step = wa_codecs.e4m3_decode(scale_bytes).astype(np.float64) * g
    w = wa_codecs.e2m1_decode(codes).astype(np.float64) * np.repeat(step, BLOCK, axis=-1)
    return w.astype(np.float32)


def weight(qweights, block_scales, global_scale, *, gemm_n: int, gemm_k: int, max_m: int = 0) -> np.ndarray:
    """The plugin's attributes and weight inputs checked -> W [N_p, K] fp32 (what `nvfp4_a16_gemm` multiplies by)."""
    if gemm_n <= 0 or gemm_n % N_ALIGN or gemm_k <= 0 or gemm_k % K_ALIGN or max_m < 0:
        raise ValueError(f"Nvfp4A16GemmPlugin: gemm_n={gemm_n} (% {N_ALIGN}), gemm_k={gemm_k} (% {K_ALIGN}), "
                         f"max_m={max_m}")
    if np.asarray(global_scale).dtype != np.float16 or np.asarray(global_scale).shape != (1,):
        raise ValueError("Nvfp4A16GemmPlugin: global_scale must be fp16 [1]")
    return dequantize(*unpack(qweights, block_scales, gemm_n, gemm_k), global_scale)


def nvfp4_a16_gemm(x, qweights, block_scales, global_scale, *, gemm_n: int, gemm_k: int, max_m: int = 0,
                   w: np.ndarray | None = None):
    """The plugin: fp16 x [..., K] -> fp16 [..., N_p]. `w`: `weight(...)` of these inputs, if already made."""
    x = np.asarray(x)
    if x.dtype != np.float16 or x.shape[-1] != gemm_k:
        raise ValueError(f"Nvfp4A16GemmPlugin: input {x.dtype} {x.shape}, expected fp16 [..., {gemm_k}]")
    if w is None:
        w = weight(qweights, block_scales, global_scale, gemm_n=gemm_n, gemm_k=gemm_k, max_m=max_m)
    return (x.astype(np.float32) @ w.T).astype(np.float16)
