"""Qwen2.5-VL vision encoder (windowed + full blocks): export, rewrite, verify on edgellm-0.9 and 0.11."""

from __future__ import annotations

import numpy as np
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
    return "qwen2_5_vl"


def test_wrong_window_permutation_fails_verify(exported, vlm, images):
    """window_index in natural order (no window permutation) with its inverse: verify must fail."""
    def unpermuted(feeds):
        feeds["window_index"] = np.arange(feeds["window_index"].size, dtype=np.int64)
        feeds["reverse_window_index"] = feeds["window_index"].copy()
    result = _wrong_feeds(exported["edgellm-0.11"].visual, vlm, images, unpermuted)
    assert not result.passed, result.table()
