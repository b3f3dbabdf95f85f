"""A reduced-vocabulary folder's `vocab_map.safetensors` (features/reduced_vocab.py writes it), read and
checked as the runtime reads it: logits index i is token vocab_map[i]."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnx_rewriter.errors import RewriteError

MAP_FILE = "vocab_map.safetensors"


def load_map(out_dir) -> np.ndarray | None:
    """The folder's vocab_map (None when it has the full vocabulary), checked as the runtime checks it."""
    path = Path(out_dir) / MAP_FILE
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    vmap = tensors.get("vocab_map")
    if len(tensors) != 1 or vmap is None or vmap.dtype != np.int32 or vmap.ndim != 1:
        raise RewriteError(f"'{path}' must hold exactly one int32 1-D tensor 'vocab_map'")
    return vmap.astype(np.int64)
