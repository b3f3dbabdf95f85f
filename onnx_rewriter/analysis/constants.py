"""Exact constants for config.json and the plugin, from the rounded ones a graph carries.

A graph holds theta only as an fp32 inv_freq constant and the softmax scale as constants in the model's
dtype (the sdpa export splits it as sqrt(scale) on q and on k: from bf16, 0.125 reads back as 0.124973).
The runtime rebuilds its RoPE table from config.json, so a theta re-derived from a rounded constant is
wrong at every position. With the checkpoint's config at hand its values are written, once the graph
has been checked against them; without one, the simplest value that reproduces the graph's constants
within their rounding is written. Either way the run's report says what was written in place of what.
"""

from __future__ import annotations

import numpy as np
import onnx

# inv_freq is computed in fp32 (HF keeps the rotary buffers fp32 in every model dtype); pow differs by a
# few ulps between torch and numpy.
INV_FREQ_RTOL = 1e-6
# The scale's relative rounding by the graph's float type: a constant rounded once, or a split sqrt rounded
# twice and multiplied back (2 ulps of the square root), with a margin.
SCALE_RTOL = {onnx.TensorProto.FLOAT: 1e-6, onnx.TensorProto.FLOAT16: 2.0 ** -9,
              onnx.TensorProto.BFLOAT16: 2.0 ** -6, onnx.TensorProto.DOUBLE: 1e-12}


def inv_freq_of(theta: float, rotary_dim: int) -> np.ndarray:
    """inv_freq as HF computes it: 1 / theta^(2i/R), in fp32."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)


def theta_estimate(inv_freq: np.ndarray, rotary_dim: int) -> float:
    """theta such that inv_freq[i] = theta^(-2i/R); read from i = 1 (unchanged by llama3/yarn scaling)."""
    if inv_freq.size < 2:
        return 10000.0
    return float(np.exp(-np.log(float(inv_freq[1])) * rotary_dim / 2.0))


def _reproduces(theta: float, inv_freq: np.ndarray, rotary_dim: int, used: np.ndarray) -> bool:
    expected = inv_freq_of(theta, rotary_dim).astype(np.float64)
    return bool(np.all(np.abs(inv_freq[used] - expected[used]) <= INV_FREQ_RTOL * expected[used]))


def snap_theta(inv_freq, rotary_dim: int, config_thetas=()) -> tuple[float, str | None]:
    """(theta to write, a note saying what it replaced or None).

    Only the frequencies a scaled RoPE leaves alone (llama3 / yarn keep the high ones) are compared: those
    within 1e-4 of the estimate's own. A config theta is taken when it reproduces them; without one, the
    shortest decimal (fewest significant digits) that does.
    """
    inv = np.asarray(inv_freq, dtype=np.float64).reshape(-1)
    est = theta_estimate(inv, rotary_dim)
    used = np.abs(inv / inv_freq_of(est, rotary_dim) - 1.0) <= 1e-4
    for theta in config_thetas:
        if _reproduces(float(theta), inv, rotary_dim, used):
            return float(theta), f"rope_theta {est:.9g} (read off inv_freq) -> {float(theta)!r} (config.json)"
    for digits in range(1, 10):
        theta = float(f"{est:.{digits}g}")
        if _reproduces(theta, inv, rotary_dim, used):
            if theta == est:
                return theta, None
            return theta, (f"rope_theta {est:.9g} (read off inv_freq) -> {theta!r} (the shortest decimal that "
                           f"reproduces the graph's fp32 inv_freq)")
    return round(est, 6 if est < 1e3 else 2), None


def snap_scale(scale: float, head_size: int, float_type: int, config_scales=()) -> tuple[float, str | None]:
    """(softmax scale, note). Candidates in order: the config's own (query_pre_attn_scalar^-1/2,
    attention_multiplier), 1/sqrt(D), then 1/sqrt(n) for the nearest integer n; the first one within the
    graph dtype's rounding of `scale` wins."""
    rtol = SCALE_RTOL.get(float_type, 1e-6)
    candidates = [(float(c), "config.json") for c in config_scales if c]
    candidates.append((float(head_size) ** -0.5, f"1/sqrt({head_size})"))
    n = round(scale ** -2) if scale > 0 else 0
    if n > 0:
        candidates.append((float(n) ** -0.5, f"1/sqrt({n})"))
    for value, why in candidates:
        if abs(scale - value) <= rtol * value:
            if value == scale:
                return value, None
            return value, f"attention scale {scale:.9g} (graph constants) -> {value!r} ({why})"
    return float(scale), None


def config_scales(hf: dict | None) -> list[float]:
    """Softmax scales an HF config states: Gemma's query_pre_attn_scalar^-1/2, Granite's attention_multiplier."""
    hf = {**(hf or {}), **((hf or {}).get("text_config") or {})}
    out = []
    if hf.get("query_pre_attn_scalar"):
        out.append(float(hf["query_pre_attn_scalar"]) ** -0.5)
    if hf.get("attention_multiplier"):
        out.append(float(hf["attention_multiplier"]))
    return out
