"""Number codecs of weight+activation quantization (contract part 3, section 16), exact, in numpy.

- E4M3 (FLOAT8E4M3FN): bias 7, 3 mantissa bits, no infinities, 0x7F / 0xFF NaN, largest finite 448.
  `e4m3_encode` rounds to nearest, ties to even, and saturates every finite value (and +-inf) beyond 448 to
  +-448, as TensorRT's FP8 QuantizeLinear and ONNX's `saturate=1` do; NaN -> 0x7F.
- E2M1 (FLOAT4E2M1): magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 by code 0..7, bit 3 the sign. Two codes a byte,
  the even index k in the low nibble (`pack_fp4` / `unpack_fp4`).
  `e2m1_encode(..., ties="smaller")` is NVIDIA's weight quantizer (`searchsorted` on the midpoints: a tie goes
  to the smaller magnitude), the rule the contract's test vectors follow; `ties="even"` is round-to-nearest-even,
  what the hardware conversion does *(inference: TensorRT does not document FP4DynamicQuantize's rounding)*.
  Both saturate at 6.
- NVFP4 weights (`nvfp4_quantize_weight`): global scale s_g = amax / (6 * 448) (fp32), per 16-element block of
  the last axis an E4M3 scale e4m3(amax_blk / (6 * s_g)), codes e2m1(w / (e4m3(s_blk) * s_g));
  w = e2m1 * e4m3 * s_g (`nvfp4_dequantize`).
- NVFP4 activations (`fp4_dynamic_quantize`, trt::TRT_FP4DynamicQuantize): the same per block of 16 along the
  last axis with the graph's fp32 scalar s_in in place of s_g.
- INT8 (`int8_quantize` / `int8_dequantize`): q = clip(rne(x / s), -128, 127), x = q * s; no zero point.

Arithmetic is in float64 where a quotient is rounded to a code (exact for fp16/fp32 inputs, one rounding);
the contract's vectors are reproduced byte for byte in tests/test_wa_codecs.py.
"""

from __future__ import annotations

import numpy as np

E4M3_MAX = 448.0
E4M3_NAN = 0x7F
E2M1_MAX = 6.0
FP4_BLOCK = 16
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_MIDPOINTS = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2  # 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0


def _e4m3_table() -> np.ndarray:
    codes = np.arange(256)
    exp, man = (codes >> 3) & 0xF, (codes & 7).astype(np.float64)
    mag = np.where(exp == 0, man * 2.0 ** -9, (1 + man / 8) * 2.0 ** (exp - 7))
    mag[(codes & 0x7F) == 0x7F] = np.nan
    return np.where(codes & 0x80, -mag, mag).astype(np.float32)


E4M3_VALUES = _e4m3_table()  # value of each code 0..255 (fp32; NaN at 0x7F and 0xFF)


def e4m3_decode(codes) -> np.ndarray:
    """fp32 values of E4M3 codes (uint8, or any array of FLOAT8E4M3FN whose bytes are the codes)."""
    c = np.asarray(codes)
    if c.dtype != np.uint8:
        c = c.view(np.uint8) if c.dtype.itemsize == 1 else c.astype(np.uint8)
    return E4M3_VALUES[c]


def e4m3_encode(x) -> np.ndarray:
    """uint8 E4M3 codes of `x`: round to nearest even, saturate to +-448, NaN -> 0x7F."""
    x = np.asarray(x, dtype=np.float64)
    a = np.where(np.isnan(x), 0.0, np.abs(x))
    with np.errstate(invalid="ignore", divide="ignore"):
        _, e = np.frexp(a)  # a = f * 2**e, f in [0.5, 1): the leading bit is 2**(e - 1)
        quantum = np.ldexp(1.0, np.maximum(e - 1, -6) - 3)  # 3 mantissa bits; subnormal step 2**-9
        m = np.rint(a / quantum) * quantum  # exact: quantum is a power of two
    m = np.minimum(m, E4M3_MAX)  # saturate (inf included)
    _, e2 = np.frexp(m)
    normal = m >= 2.0 ** -6
    exp_field = np.where(normal, e2 - 1 + 7, 0)
    man_field = np.where(normal, np.rint((np.where(normal, m, 1.0) / np.ldexp(1.0, e2 - 1) - 1) * 8),
                         np.rint(m / 2.0 ** -9))
    code = (exp_field.astype(np.int64) << 3) + man_field.astype(np.int64)
    code = np.where(np.signbit(x), code | 0x80, code)
    return np.where(np.isnan(x), E4M3_NAN, code).astype(np.uint8)


def e4m3_round(x) -> np.ndarray:
    """`x` rounded through E4M3 (fp32)."""
    return e4m3_decode(e4m3_encode(x))


def e2m1_decode(codes) -> np.ndarray:
    """fp32 values of E2M1 codes 0..15 (uint8)."""
    c = np.asarray(codes).astype(np.uint8) & 0xF
    mag = E2M1_VALUES[c & 7].astype(np.float32)
    return np.where(c & 8, -mag, mag)


def e2m1_encode(x, ties: str = "smaller") -> np.ndarray:
    """uint8 E2M1 codes 0..15 of `x`, saturated to +-6; `ties`: "smaller" (NVIDIA's weight quantizer) or "even"."""
    x = np.asarray(x, dtype=np.float64)
    a = np.minimum(np.abs(x), E2M1_MAX)
    if ties == "smaller":
        mag = np.searchsorted(_E2M1_MIDPOINTS, a, side="left")  # a == midpoint -> the code below it
    elif ties == "even":
        lo = np.searchsorted(_E2M1_MIDPOINTS, a, side="left")
        hi = np.searchsorted(_E2M1_MIDPOINTS, a, side="right")
        mag = np.where(lo == hi, lo, np.where(lo % 2 == 0, lo, hi))  # codes with an even mantissa bit: even codes
    else:
        raise ValueError(f"ties must be 'smaller' or 'even', got {ties!r}")
    if np.isnan(x).any():
        raise ValueError("e2m1_encode: NaN has no E2M1 code")
    return np.where(x < 0, mag | 8, mag).astype(np.uint8)  # a negative value keeps its sign bit, even at 0


def pack_fp4(codes) -> np.ndarray:
    """[..., K] codes 0..15 -> [..., K/2] bytes, code k even in the low nibble, k + 1 in the high one."""
    c = np.asarray(codes).astype(np.uint8)
    if c.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last axis, got {c.shape}")
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_fp4(packed) -> np.ndarray:
    """[..., K/2] bytes -> [..., K] codes (inverse of pack_fp4)."""
    p = np.asarray(packed).astype(np.uint8)
    return np.stack([p & 0xF, p >> 4], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])


def _blocks(x: np.ndarray, block: int) -> np.ndarray:
    if x.shape[-1] % block:
        raise ValueError(f"last axis {x.shape[-1]} is not a multiple of the block size {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def global_scale(w) -> np.float32:
    """NVFP4's weight global scale: fp32(amax / (6 * 448))."""
    return np.float32(np.float32(np.max(np.abs(np.asarray(w, np.float32)))) / np.float32(E2M1_MAX * E4M3_MAX))


def _block_quantize(x, scale: np.float32, ties: str):
    """(codes [..., K] uint8, block scales [..., K/16] E4M3 codes) of x under the fp32 second-level `scale`."""
    xb = _blocks(np.asarray(x, np.float32), FP4_BLOCK).astype(np.float64)
    amax = np.max(np.abs(xb), axis=-1)
    s = np.float64(scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        sblk = e4m3_encode(np.where(s > 0, (amax / (E2M1_MAX * s)).astype(np.float32), 0.0))
        step = e4m3_decode(sblk).astype(np.float64) * s  # the block's dequantization step
        y = np.where(step[..., None] > 0, xb / step[..., None], 0.0)
    codes = e2m1_encode(y, ties=ties)
    return codes.reshape(np.shape(x)), sblk


def nvfp4_quantize_weight(w, scale_2: np.float32 | None = None, ties: str = "smaller"):
    """(packed [N, K/2] uint8, block scales [N, K/16] E4M3 codes, global scale fp32) of a weight [N, K]
    (a ModelOpt NVFP4 checkpoint's `weight`, `weight_scale`, `weight_scale_2`)."""
    s_g = global_scale(w) if scale_2 is None else np.float32(scale_2)
    codes, sblk = _block_quantize(w, s_g, ties)
    return pack_fp4(codes), sblk, s_g


def nvfp4_dequantize(packed_or_codes, block_scales, scale_2, packed: bool = True) -> np.ndarray:
    """fp32 w[n, k] = e2m1(code) * e4m3(s_blk[n, k // 16]) * s_g."""
    codes = unpack_fp4(packed_or_codes) if packed else np.asarray(packed_or_codes)
    step = e4m3_decode(block_scales).astype(np.float32) * np.float32(scale_2)
    return e2m1_decode(codes) * np.repeat(step, FP4_BLOCK, axis=-1)


def fp4_dynamic_quantize(x, scale, ties: str = "even"):
    """trt::TRT_FP4DynamicQuantize(x, scale; axis=-1, block_size=16, scale_type=FLOAT8E4M3FN):
    (codes [..., K] uint8 E2M1, block scales [..., K/16] uint8 E4M3). Per block: sx = e4m3(amax / (6 * scale)),
    codes = e2m1(x / (sx * scale))."""
    return _block_quantize(x, np.float32(scale), ties)


def int8_quantize(x, scale) -> np.ndarray:
    """int8 q = clip(rne(x / s), -128, 127); `scale` a scalar or per-channel along `x`'s broadcast."""
    q = np.rint(np.asarray(x, np.float64) / np.asarray(scale, np.float64))
    return np.clip(q, -128, 127).astype(np.int8)


def int8_dequantize(q, scale) -> np.ndarray:
    return np.asarray(q, np.float32) * np.asarray(scale, np.float32)


MX_BLOCK = 32  # MXFP8: one E8M0 scale per 32 values of the last axis


def mxfp8_quantize(x):
    """(E4M3 codes [..., K] uint8, E8M0 scales [..., K/32] uint8) of x: per 32-block the power of two
    2^ceil(log2(amax / 448)) rounded up so that no value saturates (NVIDIA's MXFP8 recipe, cuDNN's
    "quantize_round_up(amax / vmax)"; stored biased by 127, clipped to 0..254; an all-zero block gets 2^-127), codes
    e4m3(x / 2^e), round to nearest even. The weights of tiny_quant's MXFP8 form, and the activation quantizer
    of trt::TRT_MXFP8DynamicQuantize *(inference: TensorRT does not document its scale rule)*."""
    xb = _blocks(np.asarray(x, np.float32), MX_BLOCK).astype(np.float64)
    amax = np.max(np.abs(xb), axis=-1)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.ceil(np.log2(amax / E4M3_MAX)), -127.0)
    biased = np.clip(e + 127, 0, 254)
    codes = e4m3_encode((xb / np.exp2(biased - 127)[..., None]).astype(np.float32))
    return codes.reshape(np.shape(x)), biased.astype(np.uint8)


def mxfp8_dequantize(codes, scales) -> np.ndarray:
    """float64 e4m3(code) * 2^(scale - 127), the E8M0 scale of each 32-block (255 is NaN in E8M0)."""
    s = np.asarray(scales).astype(np.float64)
    step = np.where(s == 255, np.nan, np.exp2(s - 127))
    return e4m3_decode(codes).astype(np.float64) * np.repeat(step, MX_BLOCK, axis=-1)
