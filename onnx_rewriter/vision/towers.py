"""Traceable forms of transformers' Qwen2.5-VL and Qwen3-VL vision towers, for the plain ONNX export.

transformers' towers derive positions, segments and windows from `grid_thw` with Python loops and
split attention per segment (`.tolist()`): not traceable with dynamic shapes. These wrappers reuse the
tower's own modules (patch embedding, norms, qkv/proj, MLPs, mergers, its RoPE function) and take
what the runtime computes on the host as inputs (vision/host.py); attention inside the `cu_seqlens`
segments is written as softmax(q k^T * scale + segment mask) v, which the vit_attention pattern then
replaces by ViTAttentionPlugin. `tests/vision` checks them against the towers numerically.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

# Traced inputs per family, in order (docs/contract.md, "Vision encoder"). `max_seqlen_carrier` is
# shape-only: nothing computes with it, so the rewrite adds it as the plugins' input.
INPUTS = {
    "qwen2_5_vl": ["input", "rotary_pos_emb", "cu_seqlens", "cu_window_seqlens", "window_index",
                   "reverse_window_index"],
    "qwen3_vl": ["input", "rotary_pos_emb", "cu_seqlens", "fast_pos_embed_idx", "fast_pos_embed_weight"],
}
_MODULES = {"qwen2_5_vl": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
            "qwen3_vl": "transformers.models.qwen3_vl.modeling_qwen3_vl"}


def segment_mask(cu_seqlens: torch.Tensor, length: int, dtype) -> torch.Tensor:
    """[T, T] additive mask: 0 where two tokens share a `cu_seqlens` segment, the dtype's minimum elsewhere."""
    pos = torch.arange(length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    seg = (pos[:, None] >= cu_seqlens[None, 1:]).sum(-1)
    same = seg[:, None] == seg[None, :]
    zero = torch.zeros((), dtype=dtype)
    return torch.where(same, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype))


class _Tower(nn.Module):
    family = ""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self._rope = importlib.import_module(_MODULES[self.family]).apply_rotary_pos_emb_vision

    def _cos_sin(self, rotary_pos_emb):
        emb = torch.cat([rotary_pos_emb, rotary_pos_emb], dim=-1)
        return emb.cos(), emb.sin()

    def _attention(self, attn, x, cos, sin, mask):
        length = x.shape[0]
        q, k, v = attn.qkv(x).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = self._rope(q, k, cos, sin)  # the tower's own function: fp32 rotate_half, back to q's dtype
        qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, T, D]
        scores = torch.matmul(qh, kh.transpose(1, 2)) * attn.scaling + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, vh).transpose(0, 1)  # [T, H, D]: the plugin's output layout
        return attn.proj(out.reshape(length, -1))

    def _block(self, blk, x, cos, sin, mask):
        x = x + self._attention(blk.attn, blk.norm1(x), cos, sin, mask)
        return x + blk.mlp(blk.norm2(x))


class Qwen25VLTower(_Tower):
    family = "qwen2_5_vl"

    def forward(self, input, rotary_pos_emb, cu_seqlens, cu_window_seqlens, window_index, reverse_window_index):
        vis = self.visual
        unit = vis.spatial_merge_unit
        x = vis.patch_embed(input)
        length, width = x.shape
        # Window order: tokens (merge-unit groups of patches) permuted window by window.
        x = x.reshape(-1, unit, width)[window_index].reshape(length, width)
        rope = rotary_pos_emb.reshape(-1, unit, rotary_pos_emb.shape[-1])[window_index]
        cos, sin = self._cos_sin(rope.reshape(length, -1))
        full = segment_mask(cu_seqlens, length, x.dtype)
        window = segment_mask(cu_window_seqlens, length, x.dtype)
        for i, blk in enumerate(vis.blocks):
            x = self._block(blk, x, cos, sin, full if i in vis.fullatt_block_indexes else window)
        return vis.merger(x)[reverse_window_index]


class Qwen3VLTower(_Tower):
    family = "qwen3_vl"

    def forward(self, input, rotary_pos_emb, cu_seqlens, fast_pos_embed_idx, fast_pos_embed_weight):
        vis = self.visual
        x = vis.patch_embed(input)
        pos = (vis.pos_embed(fast_pos_embed_idx) * fast_pos_embed_weight[:, :, None]).sum(0)
        x = x + pos.to(x.dtype)
        cos, sin = self._cos_sin(rotary_pos_emb)
        mask = segment_mask(cu_seqlens, x.shape[0], x.dtype)
        deepstack = []
        for i, blk in enumerate(vis.blocks):
            x = self._block(blk, x, cos, sin, mask)
            if i in vis.deepstack_visual_indexes:
                deepstack.append(vis.deepstack_merger_list[vis.deepstack_visual_indexes.index(i)](x))
        return (vis.merger(x), *deepstack)


TOWERS = {"qwen2_5_vl": Qwen25VLTower, "qwen3_vl": Qwen3VLTower}


def output_names(family: str, visual) -> list[str]:
    if family == "qwen3_vl":
        return ["output"] + [f"deepstack_features_{i}" for i in range(len(visual.deepstack_visual_indexes))]
    return ["output"]
