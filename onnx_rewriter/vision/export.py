"""Plain ONNX export of a VLM's vision tower with the runtime's inputs (torch.onnx, dynamo).

Dynamic dims: G merged tokens (T = 4G patches for merge 2), segments, windows and the carrier length.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from . import host, towers

# A sample with two images, one larger than a window, so tracing sees every branch with real sizes.
SAMPLE_GRID = np.array([[1, 12, 16], [1, 4, 8]])


def example_feeds(family: str, visual, float_type) -> dict:
    cfg = visual.config
    n = int(np.prod(SAMPLE_GRID, axis=1).sum())
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    patches = np.random.default_rng(0).standard_normal((n, width)).astype(np.float32)
    return host.encoder_inputs(family, patches, SAMPLE_GRID, cfg, float_type=float_type)


def _dynamic_shapes(family: str, unit: int):
    import torch

    dim = torch.export.Dim
    groups = dim("groups", min=1, max=65536)
    tokens = unit * groups
    shapes = {"input": {0: tokens}, "rotary_pos_emb": {0: tokens}, "cu_seqlens": {0: dim("segments_1", min=2)}}
    if family == "qwen2_5_vl":
        shapes.update(cu_window_seqlens={0: dim("windows_1", min=2)}, window_index={0: groups},
                      reverse_window_index={0: groups})
    else:
        shapes.update(fast_pos_embed_idx={1: tokens}, fast_pos_embed_weight={1: tokens})
    return shapes


def export_tower(family: str, visual, path: Path, float_type=np.float16) -> Path:
    """Write the plain export of `visual` (already in its export dtype) to `path`."""
    import torch

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    wrapper = towers.TOWERS[family](visual).eval()
    feeds = example_feeds(family, visual, float_type)
    names = towers.INPUTS[family]
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(wrapper, args, dynamo=True, optimize=True, input_names=names,
                                 output_names=towers.output_names(family, visual),
                                 dynamic_shapes=_dynamic_shapes(family, visual.spatial_merge_unit), verbose=False)
        prog.save(str(path), external_data=False)
    return path
