"""Host-side encoder inputs (vision/host.py) against transformers' own helpers, value for value."""

from __future__ import annotations

import numpy as np
import torch
from transformers import vision_utils as vu

from onnx_rewriter.vision import host

GRID = np.array([[1, 12, 16], [2, 4, 6], [1, 2, 2]])  # a multi-window image, a 2-frame clip, a tiny one
VISION = {"hidden_size": 64, "num_heads": 2, "spatial_merge_size": 2, "patch_size": 14, "window_size": 56,
          "num_position_embeddings": 64, "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}}


def test_cu_seqlens_one_segment_per_frame():
    assert host.cu_seqlens(GRID).tolist() == [0, 192, 216, 240, 244]
    assert host.cu_seqlens(GRID).tolist() == vu.get_vision_cu_seqlens(torch.tensor(GRID)).tolist()


def test_patch_positions_match_transformers():
    ours = host.patch_positions(GRID, 2)
    assert np.array_equal(ours, vu.get_vision_position_ids(torch.tensor(GRID), 2).numpy())


def test_rotary_pos_emb_is_row_then_col_angles():
    emb = host.rotary_pos_emb(GRID, VISION)
    inv = 1.0 / 10000 ** (np.arange(0, 16, 2) / 16)  # head 32 -> angles over D/2 = 16, 8 frequencies
    pos = vu.get_vision_position_ids(torch.tensor(GRID), 2).numpy()
    assert emb.shape == (244, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, np.concatenate([pos[:, :1] * inv, pos[:, 1:] * inv], axis=1), rtol=1e-6)


def test_window_index_matches_transformers():
    index, cu = host.window_index(GRID, VISION)
    ref_index, ref_cu = vu.get_vision_window_index(torch.tensor(GRID), 2, 56, 14)
    assert index.tolist() == ref_index.tolist()
    assert cu.tolist() == ref_cu.tolist()
    assert sorted(index.tolist()) == list(range(61))  # a permutation of the 61 merged tokens


def test_bilinear_taps_match_transformers():
    idx, weight = host.bilinear_pos_embed(GRID, VISION)
    ref_idx, ref_w = vu.get_vision_interpolation_indices_and_weights(torch.tensor(GRID), 8, mode="bilinear",
                                                                     align_corners=True, spatial_merge_size=2)
    assert idx.shape == (4, 244) and np.array_equal(idx, ref_idx.numpy().T)
    np.testing.assert_allclose(weight, ref_w.numpy().T, atol=1e-6)


def test_encoder_inputs_per_family():
    patches = np.zeros((244, 1176), np.float32)
    q25 = host.encoder_inputs("qwen2_5_vl", patches, GRID, VISION)
    assert sorted(q25) == sorted(["input", "rotary_pos_emb", "cu_seqlens", "max_seqlen_carrier", "cu_window_seqlens",
                                  "window_index", "reverse_window_index"])
    assert q25["input"].dtype == np.float16 and q25["max_seqlen_carrier"].shape == (192,)
    assert np.array_equal(q25["window_index"][q25["reverse_window_index"]], np.arange(61))
    q3 = host.encoder_inputs("qwen3_vl", patches, GRID, VISION)
    assert q3["fast_pos_embed_idx"].dtype == np.int64 and q3["fast_pos_embed_weight"].dtype == np.float16
