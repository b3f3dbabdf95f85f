"""RoPE cos/sin tables: what the EdgeLLM runtime feeds the plugin vs what the HF model uses.

Row p of a table is ``[cos(p·θ_0) … cos(p·θ_{R/2-1}) | sin(p·θ_0) … sin(p·θ_{R/2-1})]``.
``verify`` compares the two to report models whose RoPE the runtime reproduces only
approximately (llama3 / yarn / linear scaling, which the runtime treats as plain default).
"""

from __future__ import annotations

import numpy as np


def _rotary_dim(head_dim: int, partial_rotary_factor) -> int:
    return int(head_dim * float(1.0 if partial_rotary_factor is None else partial_rotary_factor))


def runtime_rope_table(config: dict, num_positions: int) -> np.ndarray:
    """``[P, R]`` float32 table as the runtime builds it from an EdgeLLM ``config.json``.

    ``rope_scaling`` is deliberately not applied: the runtime treats llama3 / yarn / linear
    as plain default RoPE (contract section 2). Arithmetic mirrors HF's float32 default path
    (inv_freq in float32, p·inv_freq in float32) so an unscaled model compares equal.
    """
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    r = _rotary_dim(head_dim, config.get("partial_rotary_factor"))
    theta = float(config.get("rope_theta") or 10000.0)
    exponents = np.arange(0, r, 2, dtype=np.int64).astype(np.float32) / np.float32(r)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
    pos = np.arange(num_positions, dtype=np.float32)
    freqs = pos[:, None] * inv_freq[None, :]
    return np.concatenate([np.cos(freqs), np.sin(freqs)], axis=-1).astype(np.float32)


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
