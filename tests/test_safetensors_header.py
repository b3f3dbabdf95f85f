"""The one safetensors header reader (modelio/safetensors_header.py): offsets point at the tensors' bytes."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from onnx_rewriter.modelio.safetensors_header import read_header


def test_offsets_point_at_each_tensors_bytes(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(5, dtype=np.int64)}
    save_file(tensors, str(path), metadata={"format": "np"})
    header = read_header(path)
    assert sorted(header.tensors) == ["a", "b"]  # __metadata__ left out
    data = path.read_bytes()
    assert header.data_end == len(data)
    for name, arr in tensors.items():
        start, end = header.tensors[name]["data_offsets"]
        assert data[header.data_start + start:header.data_start + end] == arr.tobytes()
        assert header.tensors[name]["shape"] == list(arr.shape)


@pytest.mark.parametrize("content", [b"\x01", (10**6).to_bytes(8, "little") + b"{}", (2).to_bytes(8, "little") + b"[]"])
def test_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises((ValueError, struct.error)):  # checkpoint_check turns these into one line
        read_header(path)
