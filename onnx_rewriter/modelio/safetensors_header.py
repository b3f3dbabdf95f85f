"""The header of a safetensors file, read without reading a tensor.

The format: an 8-byte little-endian header length n, n bytes of JSON (tensor name -> dtype, shape,
data_offsets relative to the end of the header; `__metadata__` aside), then the tensors' bytes.
The `safetensors` library does not say where a tensor's bytes lie, which checkpoint references need.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Header:
    tensors: dict  # name -> {"dtype", "shape", "data_offsets"}, `__metadata__` left out
    data_start: int  # file offset of the first tensor byte (8 + the header's length)

    @property
    def data_end(self) -> int:
        """The file offset the last tensor ends at: a shorter file is truncated."""
        return self.data_start + max((info["data_offsets"][1] for info in self.tensors.values()), default=0)


def read_header(path) -> Header:
    """The header of the safetensors file `path`; ValueError (or struct.error, UnicodeDecodeError) when it is
    not one, OSError when it cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8:
            raise ValueError("header longer than the file")
        header = json.loads(fh.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    return Header({k: v for k, v in header.items() if k != "__metadata__"}, 8 + n)


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: str  # safetensors' name: "F32", "BF16", "I32", ...
    shape: tuple
    offset: int  # file offset of its first byte
    length: int


class TensorIndex:
    """Every tensor of a folder's *.safetensors files, each header parsed once: where a tensor's bytes lie, and
    the bytes themselves read without the library (whose safe_open re-parses a whole header per call: thousands
    of entries in an MoE checkpoint)."""

    def __init__(self, folder):
        self.entries: dict[str, Entry] = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            header = read_header(f)
            for name, info in header.tensors.items():
                start, end = info["data_offsets"]
                self.entries[name] = Entry(f, info["dtype"], tuple(info["shape"]), header.data_start + start,
                                           end - start)

    def raw(self, name: str):
        """The tensor's bytes, a uint8 array (OSError when the file ends before them)."""
        import numpy as np

        e = self.entries[name]
        raw = np.fromfile(e.file, dtype=np.uint8, count=e.length, offset=e.offset)
        if raw.size != e.length:
            raise OSError(f"'{e.file.name}': tensor '{name}' ends past the end of the file")
        return raw
