"""The Q/DQ nodes of weight+activation quantized graphs (contract part 3, sections 16.3-16.5), in numpy, as the
runtime computes them; the number formats are reference/wa_codecs.py's.

- `quantize_linear(x, scale, zero_point, axis, block_size, output_dtype)`: ONNX QuantizeLinear to FLOAT8E4M3FN
  (saturating) or int8 / uint8: y = round_even(x / scale) (+ zero point), x / scale divided in fp32
  *(inference: TensorRT does not document the precision; onnx's own reference divides in x's dtype, fp16,
  which rounds twice)*.
- `dequantize_linear(x, scale, zero_point, axis, block_size)`: ONNX (and trt::) DequantizeLinear from
  FLOAT8E4M3FN, FLOAT4E2M1, int8/uint8/int4/uint4; the scale per tensor, per axis or per block of
  `block_size` along `axis`; the output in the scale's dtype, the product rounded once (as an IEEE multiply in
  that dtype).
- `fp4_dynamic_quantize(x, scale, axis, block_size)`: trt::TRT_FP4DynamicQuantize, (E2M1 codes, E4M3 block
  scales) per block of 16 along the last axis; E2M1 rounds to nearest even *(inference: the hardware's
  conversion; NVIDIA's weight quantizer rounds ties down, which only matters at exact ties)*.

FLOAT8E4M3FN / FLOAT4E2M1 arrays are ml_dtypes arrays, one element a byte, as onnx's evaluator holds them.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from . import wa_codecs as C

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E2M1 = np.dtype(ml_dtypes.float4_e2m1fn)
FLOAT8E4M3FN, INT8, UINT8 = 17, 3, 2  # onnx TensorProto codes of the output types


def decode(x) -> np.ndarray:
    """float64 values of a quantized array (E4M3, E2M1, integer types)."""
    x = np.asarray(x)
    if x.dtype == E4M3:
        return C.e4m3_decode(x.view(np.uint8)).astype(np.float64)
    if x.dtype == E2M1:
        return C.e2m1_decode(x.view(np.uint8)).astype(np.float64)
    if x.dtype.kind in "iu" or x.dtype.name in ("int4", "uint4"):
        return x.astype(np.float64)
    raise NotImplementedError(f"DequantizeLinear reference: input type {x.dtype} not modelled")


def _broadcast(scale, shape, axis: int, block_size: int) -> np.ndarray:
    """`scale` (per tensor, per axis or blocked) expanded to `shape`, float64."""
    s = np.asarray(scale)
    s = decode(s) if s.dtype in (E4M3, E2M1) else s.astype(np.float64)
    rank = len(shape)
    if s.size == 1 and not block_size:
        return np.broadcast_to(s.reshape(()), shape)
    axis = axis % rank
    if block_size:
        if s.ndim != rank or any(s.shape[d] != shape[d] for d in range(rank) if d != axis) \
                or s.shape[axis] != -(-shape[axis] // block_size):
            raise ValueError(f"blocked scale {list(s.shape)} does not fit input {list(shape)} with block_size "
                             f"{block_size} on axis {axis}")
        return np.repeat(s, block_size, axis=axis)[tuple(slice(0, n) for n in shape)]
    if s.ndim != 1 or s.shape[0] != shape[axis]:
        raise ValueError(f"per-axis scale {list(s.shape)} does not fit input {list(shape)} on axis {axis}")
    view = [1] * rank
    view[axis] = shape[axis]
    return np.broadcast_to(s.reshape(view), shape)


def dequantize_linear(x, scale, zero_point=None, axis: int = 1, block_size: int = 0) -> np.ndarray:
    x = np.asarray(x)
    out_dtype = np.asarray(scale).dtype
    if out_dtype in (E4M3, E2M1):
        out_dtype = np.dtype(np.float32)
    v = decode(x)
    if zero_point is not None:
        zp = decode(zero_point)
        if x.dtype in (E4M3, E2M1):
            if np.any(zp != 0):
                raise ValueError("DequantizeLinear: a float8/float4 input takes no zero point other than 0")
        else:
            v = v - _broadcast(zp, x.shape, axis, block_size)
    return (v * _broadcast(scale, x.shape, axis, block_size)).astype(out_dtype)


def quantize_linear(x, scale, zero_point=None, axis: int = 1, block_size: int = 0,
                    output_dtype: int | None = None, saturate: int = 1) -> np.ndarray:
    x = np.asarray(x)
    if not output_dtype:  # the zero point's type, uint8 without one (ONNX's rule)
        zp_dtype = None if zero_point is None else np.asarray(zero_point).dtype
        output_dtype = {E4M3: FLOAT8E4M3FN, np.dtype(np.int8): INT8}.get(zp_dtype, UINT8)
    s = _broadcast(scale, x.shape, axis, block_size).astype(np.float32)
    y = x.astype(np.float32) / s  # fp32 division (see the module docstring)
    if output_dtype == FLOAT8E4M3FN:
        if not saturate:
            raise NotImplementedError("QuantizeLinear reference: saturate=0 not modelled (the runtime saturates)")
        return C.e4m3_encode(y).view(E4M3)
    if output_dtype in (INT8, UINT8):
        lo, hi, dt = (-128, 127, np.int8) if output_dtype == INT8 else (0, 255, np.uint8)
        q = np.rint(y.astype(np.float64))
        if zero_point is not None:
            q = q + _broadcast(np.asarray(zero_point), x.shape, axis, block_size)
        return np.clip(q, lo, hi).astype(dt)
    raise NotImplementedError(f"QuantizeLinear reference: output type {output_dtype} not modelled")


def fp4_dynamic_quantize(x, scale, axis: int = -1, block_size: int = 16, scale_type: int = FLOAT8E4M3FN):
    """trt::TRT_FP4DynamicQuantize: (x_f4 FLOAT4E2M1 [..., K], sx FLOAT8E4M3FN [..., K/16])."""
    x = np.asarray(x)
    if axis not in (-1, x.ndim - 1) or block_size != C.FP4_BLOCK or scale_type != FLOAT8E4M3FN:
        raise NotImplementedError(f"TRT_FP4DynamicQuantize reference: axis={axis}, block_size={block_size}, "
                                  f"scale_type={scale_type} not modelled (the contract's form: -1, 16, 17)")
    if x.ndim not in (2, 3):
        raise ValueError(f"TRT_FP4DynamicQuantize takes a 2-D or 3-D input (TensorRT's rule), got rank {x.ndim}")
    codes, sx = C.fp4_dynamic_quantize(x, np.float32(np.asarray(scale, np.float32).reshape(())), ties="even")
    return codes.view(E2M1), sx.view(E4M3)


def _mx_form(op: str, x, axis: int, block_size: int) -> None:
    if axis not in (-1, np.ndim(x) - 1) or block_size != C.MX_BLOCK:
        raise NotImplementedError(f"{op} reference: axis={axis}, block_size={block_size} not modelled (the "
                                  f"contract's form: -1, 32)")


def mxfp8_dynamic_quantize(x, axis: int = -1, block_size: int = 32, output_dtype: int = FLOAT8E4M3FN):
    """trt::TRT_MXFP8DynamicQuantize: (x_q FLOAT8E4M3FN [..., K], E8M0 scales uint8 [..., K/32]) of fp16 x, the
    scale rule of wa_codecs.mxfp8_quantize *(inference)*."""
    x = np.asarray(x)
    _mx_form("TRT_MXFP8DynamicQuantize", x, axis, block_size)
    if output_dtype != FLOAT8E4M3FN:
        raise NotImplementedError(f"TRT_MXFP8DynamicQuantize reference: output_dtype {output_dtype} not modelled")
    codes, scales = C.mxfp8_quantize(x)
    return codes.view(E4M3), scales


def mxfp8_dequantize_linear(x, scale, axis: int = -1, block_size: int = 32, output_dtype: int = 10) -> np.ndarray:
    """trt::TRT_MXFP8DequantizeLinear: e4m3(x) * 2^(scale - 127) per 32-block, rounded once to `output_dtype`."""
    x = np.asarray(x)
    _mx_form("TRT_MXFP8DequantizeLinear", x, axis, block_size)
    y = C.mxfp8_dequantize(x.view(np.uint8), np.asarray(scale, np.uint8))
    return y.astype({10: np.float16, 1: np.float32}[int(output_dtype)])
