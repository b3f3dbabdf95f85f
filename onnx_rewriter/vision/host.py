"""What the runtime computes on the host before it runs the vision encoder, in numpy.

From the image processor's patches and `grid_thw` (t, h, w in patches per image) and the HF
`vision_config`, the encoder's inputs (see docs/contract.md, "Vision encoder"):
rotary_pos_emb (per-patch (h, w) angles), cu_seqlens (one segment per frame), and per family
the window permutation (Qwen2.5-VL) or the bilinear position-embedding taps (Qwen3-VL).
Patches are in the processor's order: spatial-merge blocks of merge x merge patches, row-major.
"""

from __future__ import annotations

import numpy as np


def _cfg(vision_config, key, default=None):
    if isinstance(vision_config, dict):
        return vision_config.get(key, default)
    return getattr(vision_config, key, default)


def head_dim(vision_config) -> int:
    return int(_cfg(vision_config, "hidden_size")) // int(_cfg(vision_config, "num_heads"))


def rope_theta(vision_config) -> float:
    params = _cfg(vision_config, "rope_parameters") or {}
    return float(params.get("rope_theta", _cfg(vision_config, "rope_theta", 10000.0)))


def patch_positions(grid_thw, merge: int) -> np.ndarray:
    """int64 [N, 2]: the (row, col) of every patch, in merge-block order, frames repeated."""
    rows = []
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).tolist():
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hh = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        rows.append(np.tile(np.stack([hh, ww], axis=-1), (t, 1)))
    return np.concatenate(rows, axis=0)


def rotary_pos_emb(grid_thw, vision_config) -> np.ndarray:
    """fp32 [N, D/2]: angles cat(row * inv_freq, col * inv_freq), inv_freq over D/2 (axial 2-D RoPE)."""
    spatial = head_dim(vision_config) // 2
    inv_freq = 1.0 / (rope_theta(vision_config) ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
    pos = patch_positions(grid_thw, int(_cfg(vision_config, "spatial_merge_size"))).astype(np.float32)
    freqs = pos[:, :, None] * inv_freq.astype(np.float32)  # [N, 2, D/4]
    return np.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1).astype(np.float32)


def cu_seqlens(grid_thw) -> np.ndarray:
    """int32 [frames + 1]: every frame of every image is its own attention segment."""
    lens = [h * w for t, h, w in np.asarray(grid_thw, dtype=np.int64).tolist() for _ in range(t)]
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def window_index(grid_thw, vision_config) -> tuple[np.ndarray, np.ndarray]:
    """(window_index int64 [G], cu_window_seqlens int32 [W+1]) for Qwen2.5-VL's windowed blocks.

    Merged tokens (merge x merge patch groups) are tiled into windows of `window_size / patch / merge`
    tokens a side; window_index lists the tokens window by window, each window row-major."""
    merge = int(_cfg(vision_config, "spatial_merge_size"))
    side = int(_cfg(vision_config, "window_size")) // merge // int(_cfg(vision_config, "patch_size"))
    index, cu, offset = [], [0], 0
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).tolist():
        gh, gw = h // merge, w // merge
        ids = np.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = side - gh % side, side - gw % side
        padded = np.pad(ids, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
        nh, nw = (gh + ph) // side, (gw + pw) // side
        padded = padded.reshape(t, nh, side, nw, side).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, side * side)
        counts = (padded != -100).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(counts) * merge * merge + cu[-1]).tolist())
        offset += t * gh * gw
    cu = np.asarray(cu, dtype=np.int32)
    keep = np.concatenate([[True], cu[1:] != cu[:-1]])  # empty windows add no boundary
    return np.concatenate(index).astype(np.int64), cu[keep]


def bilinear_pos_embed(grid_thw, vision_config) -> tuple[np.ndarray, np.ndarray]:
    """(idx int64 [4, N], weight fp32 [4, N]): the 4 bilinear taps (align_corners) into Qwen3-VL's
    square learned `pos_embed` grid for every patch, in merge-block order."""
    side = int(int(_cfg(vision_config, "num_position_embeddings")) ** 0.5)
    pos = patch_positions(grid_thw, int(_cfg(vision_config, "spatial_merge_size")))
    sizes = np.concatenate([np.tile([[h, w]], (t * h * w, 1))
                            for t, h, w in np.asarray(grid_thw, dtype=np.int64).tolist()])

    def axis(index, size):
        src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
        floor = np.floor(src)
        taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
        weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2)), 0, None)
        return taps, weights.astype(np.float32)

    ht, hw = axis(pos[:, 0], sizes[:, 0])
    wt, ww = axis(pos[:, 1], sizes[:, 1])
    idx = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
    weight = (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4)
    return idx.T.copy(), weight.T.copy()


def max_seqlen_carrier(cu: np.ndarray) -> np.ndarray:
    """int32 zeros whose length is the longest segment (the plugin reads only its shape)."""
    return np.zeros(int(np.max(np.diff(cu))), dtype=np.int32)


def encoder_inputs(family: str, patches: np.ndarray, grid_thw, vision_config, float_type=np.float16) -> dict:
    """Every graph input of the exported encoder for these patches, as the runtime fills them."""
    cu = cu_seqlens(grid_thw)
    feeds = {"input": np.asarray(patches).astype(float_type),
             "rotary_pos_emb": rotary_pos_emb(grid_thw, vision_config),
             "cu_seqlens": cu, "max_seqlen_carrier": max_seqlen_carrier(cu)}
    if family == "qwen2_5_vl":
        index, cu_window = window_index(grid_thw, vision_config)
        feeds.update(cu_window_seqlens=cu_window, window_index=index,
                     reverse_window_index=np.argsort(index).astype(np.int64))
    elif family == "qwen3_vl":
        idx, weight = bilinear_pos_embed(grid_thw, vision_config)
        feeds.update(fast_pos_embed_idx=idx, fast_pos_embed_weight=weight.astype(float_type))
    else:
        raise ValueError(f"no host input preparation for vision family '{family}'")
    return feeds
