"""verify's oracle for an FP8 KV cache: transformers with each layer's attention reading K and V the way the
runner's calls see them (reference/plugin.py): tokens of the same call (the prompt, or one decode token)
fresh, every earlier token as fp8(x / scale) * scale, with the folder's per-layer scales.

The model runs the full sequence once; for each (query, key) pair the key and value are taken fresh or
rounded by whether the key was written in an earlier call, so every position's hidden state is what the
runtime computed for it at its own step.
"""

from __future__ import annotations

import numpy as np

from onnx_rewriter.reference import fp8

NAME = "onnx_rewriter_fp8_kv"


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    import torch

    state = module._fp8_state  # (scales per layer, prompt length), set by Fp8Oracle
    ks, vs = state["scales"][module.layer_idx]
    plen = state["prompt_len"]
    kr = torch.from_numpy(fp8.round_trip(key.detach().float().numpy(), ks))
    vr = torch.from_numpy(fp8.round_trip(value.detach().float().numpy(), vs))
    groups = query.shape[1] // key.shape[1]

    def rep(t):
        return t.float().repeat_interleave(groups, dim=1)

    q = query.float()
    s, t = q.shape[2], key.shape[2]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    qpos = torch.arange(t - s, t)[:, None]
    kpos = torch.arange(t)[None, :]
    fresh = (kpos == qpos) | ((kpos < plen) & (qpos < plen))  # written in the same call as the query
    scores = torch.where(fresh, q @ rep(key).transpose(-1, -2), q @ rep(kr).transpose(-1, -2)) * scale
    allowed = kpos <= qpos
    if attention_mask is not None:
        m = attention_mask[..., :t]
        if m.dtype == torch.bool:
            allowed = allowed & m
        else:
            scores = scores + m.float()
    window = getattr(module, "sliding_window", None)
    if window:
        allowed = allowed & (kpos > qpos - window)
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out = (p * fresh) @ rep(value) + (p * ~fresh) @ rep(vr)
    return out.transpose(1, 2).contiguous().to(query.dtype), None


def simulate(hf_model, scales: list[tuple[float, float]]) -> dict:
    """Switch `hf_model`'s attention to the FP8 cache simulation; returns the state whose `prompt_len` the
    caller sets before each run."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    state = {"scales": scales, "prompt_len": 0}
    layers = [m for m in hf_model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]
    if len(layers) != len(scales):
        raise ValueError(f"the model has {len(layers)} attention layers, the folder FP8 scales for {len(scales)}")
    for m in layers:
        m._fp8_state = state
    for cfg in {id(c): c for c in (hf_model.config, getattr(hf_model.config, "text_config", None)) if c}.values():
        cfg._attn_implementation = NAME
    return state


class Fp8Oracle:
    """Wraps an HFOracle: the prompt a sequence starts with was one call, every later token its own."""

    def __init__(self, oracle, scales, rows: list[list[int]]):
        self.oracle, self.rows = oracle, [list(r) for r in rows]
        self.config = oracle.config
        self.state = simulate(oracle.model, scales)

    def __call__(self, seq: list[int]) -> np.ndarray:
        starts = [len(r) for r in self.rows if list(seq[:len(r)]) == r]
        self.state["prompt_len"] = max(starts) if starts else len(seq)
        return self.oracle(seq)
