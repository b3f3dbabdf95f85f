"""RoPE cos/sin tables: what the EdgeLLM runtime feeds the plugin vs what the HF model uses.

Row p of a table is ``[cos(p·θ_0) … cos(p·θ_{R/2-1}) | sin(p·θ_0) … sin(p·θ_{R/2-1})]``.
The rewriter compares the two to decide which layers may use the runtime's table (the others get their
own table baked into the graph), and ``verify`` checks the written folder the same way.
"""

from __future__ import annotations

import numpy as np

from onnx_rewriter.matching.results import mrope_axes


def _rotary_dim(head_dim: int, partial_rotary_factor) -> int:
    return int(head_dim * float(1.0 if partial_rotary_factor is None else partial_rotary_factor))


# rope_scaling types the runtime reads (collectRopeConfig); any other (llama3, linear, yarn, ...) is built as
# plain default RoPE from rope_theta, so the rewriter bakes those models' tables into the graph instead.
RUNTIME_ROPE_TYPES = ("default", "dynamic", "longrope")


def runtime_rope_type(config: dict) -> str:
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("type") or scaling.get("rope_type") or "default"
    return kind if kind in RUNTIME_ROPE_TYPES else "default"


def runtime_rope_table(config: dict, num_positions: int, start: int = 0) -> np.ndarray:
    """``[P, R]`` float32 table as the runtime builds it from an EdgeLLM ``config.json`` (rows ``start`` up to
    ``num_positions``: the same values as those rows of the whole table).

    Mirrors the runtime's initializer: angle = p · rotaryScale / theta^(2d/R) in fp32. llama3 / yarn /
    linear are built as plain default (the runtime does not know them); dynamic is the default table up
    to max_position_embeddings (theta rescaled by an NTK ``alpha`` when given); longrope uses the short
    factors (sequences up to original_max_position_embeddings) times HF's attention factor.
    """
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    r = _rotary_dim(head_dim, config.get("partial_rotary_factor"))
    theta = np.float32(config.get("rope_theta") or 10000.0)
    scaling, kind = config.get("rope_scaling") or {}, runtime_rope_type(config)
    if kind == "dynamic" and scaling.get("alpha"):
        theta = np.float32(theta * np.float32(scaling["alpha"]) ** np.float32(head_dim / (head_dim - 2.0)))
    exponents = np.float32(2.0) * np.arange(r // 2, dtype=np.float32) / np.float32(r)
    divisor = np.power(theta, exponents).astype(np.float32)
    gain = np.float32(1.0)
    if kind == "longrope":
        divisor = (divisor * np.asarray(scaling["short_factor"], dtype=np.float32)).astype(np.float32)
        original = config.get("original_max_position_embeddings") or config["max_position_embeddings"]
        factor = config["max_position_embeddings"] / original
        gain = np.float32(1.0 if factor <= 1.0 else np.sqrt(1 + np.log(factor) / np.log(original)))
    pos = np.arange(start, num_positions, dtype=np.float32)
    freqs = (pos[:, None] / divisor[None, :]).astype(np.float32)
    return (np.concatenate([np.cos(freqs), np.sin(freqs)], axis=-1) * gain).astype(np.float32)


def table_tolerance(num_positions: int, fp16: bool = True, start: int = 0) -> np.ndarray:
    """Per-row tolerance when comparing two tables built in fp32: fp16 resolution (2^-11, what the fp16
    attention sees; 1e-6 for an fp32 graph) plus two fp32 ulps of the largest angle p·inv_freq
    (inv_freq <= 1), which the two sides may round differently. ``[P, 1]`` (rows ``start`` on)."""
    pos = np.arange(start, num_positions, dtype=np.float32)
    return ((2.0 ** -11 if fp16 else 1e-6) + 2.0 * np.spacing(np.maximum(pos, 1.0)))[:, None]


def first_difference(table, model, tolerance=None) -> tuple[float, int | None]:
    """(max |table - model|, first position where it exceeds the tolerance or None) over common rows."""
    a, b = np.asarray(table, dtype=np.float32), np.asarray(model, dtype=np.float32)
    if a.shape[-1] != b.shape[-1]:
        return float("inf"), 0
    rows = min(a.shape[-2], b.shape[-2])
    err = np.abs(a[..., :rows, :] - b[..., :rows, :]).reshape(rows, -1) if rows else np.zeros((0, 1))
    tol = table_tolerance(rows) if tolerance is None else tolerance
    bad = np.nonzero(np.any(err > tol, axis=-1))[0]
    return (float(err.max()) if rows else 0.0), (int(bad[0]) if bad.size else None)


def model_rope_table(hf_config, num_positions: int, layer_type: str | None = None) -> np.ndarray:
    """``[P, R]`` float32 table computed the way the transformers-5 model does.

    Uses ``ROPE_INIT_FUNCTIONS[rope_type]`` for scaled types and the common default
    (theta, partial_rotary_factor, head_dim) otherwise; the returned ``attention_scaling``
    (yarn / longrope) is multiplied into cos and sin, as the HF rotary embedding does.
    ``layer_type`` selects an entry of nested ``rope_parameters`` (Gemma3-style). For
    ``dynamic`` this is the table before any length-triggered update.
    """
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = hf_config.rope_parameters
    if layer_type is not None:
        params = params[layer_type]
    elif "rope_type" not in params and "rope_theta" not in params:
        raise ValueError(f"rope_parameters is nested by layer type {sorted(params)}; pass layer_type")
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        dim = _rotary_dim(head_dim, params.get("partial_rotary_factor"))
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
        scaling = 1.0
    elif rope_type in ROPE_INIT_FUNCTIONS:
        fn = ROPE_INIT_FUNCTIONS[rope_type]
        inv_freq, scaling = fn(hf_config, layer_type=layer_type) if layer_type else fn(hf_config)
    else:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    pos = torch.arange(num_positions, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq.to(torch.float32)[None, :]
    table = torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)  # as HF's forward
    return table.numpy().astype(np.float32)


def table_difference(a, b) -> float:
    """Max absolute difference over the common rows; inf when the rotary widths differ."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    if a.shape[-1] != b.shape[-1]:
        return float("inf")
    rows = min(a.shape[-2], b.shape[-2])
    if rows == 0:
        return 0.0
    return float(np.max(np.abs(a[..., :rows, :] - b[..., :rows, :])))


def runtime_mrope_table(config: dict, positions) -> np.ndarray:
    """``[N, R]`` float32 rows for N tokens with 3-D positions ``[3, N]`` (t, h, w), as the runtime fills
    its M-RoPE table from an EdgeLLM ``config.json`` (``rope_scaling.mrope_section``, ``rope_theta``)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    r = _rotary_dim(head_dim, config.get("partial_rotary_factor"))
    scaling = config.get("rope_scaling") or {}
    axes = mrope_axes(scaling["mrope_section"], bool(scaling.get("mrope_interleaved")), r // 2)
    theta = np.float32(config.get("rope_theta") or 10000.0)
    divisor = np.power(theta, np.float32(2.0) * np.arange(r // 2, dtype=np.float32) / np.float32(r)).astype(np.float32)
    pos = np.asarray(positions, dtype=np.float32)[axes]  # [R/2, N]: each pair's own row
    freqs = (pos.T / divisor[None, :]).astype(np.float32)
    return np.concatenate([np.cos(freqs), np.sin(freqs)], axis=-1).astype(np.float32)
