"""Qwen3-VL vision encoder (learned position grid, deepstack outputs): export, rewrite, verify on 0.9 and 0.11."""

from __future__ import annotations

import pytest

from tests.vision.common import (  # noqa: F401  (the shared tests)
    _wrong_feeds,
    test_graph_io_and_plugins,
    test_mask_that_is_not_a_segment_mask_is_refused,
    test_refuses_target_without_vit_plugin,
    test_side_files,
    test_verify_passes,
    test_wrapper_computes_the_tower,
    test_wrong_rope_fails_verify,
)


@pytest.fixture(scope="module")
def family():
    return "qwen3_vl"


def test_wrong_position_embedding_taps_fail_verify(exported, vlm, images):
    """Bilinear taps in the wrong corner order (weights reversed against their indices): verify must fail."""
    def reversed_weights(feeds):
        feeds["fast_pos_embed_weight"] = feeds["fast_pos_embed_weight"][::-1].copy()
    result = _wrong_feeds(exported["edgellm-0.11"].visual, vlm, images, reversed_weights)
    assert not result.passed, result.table()
