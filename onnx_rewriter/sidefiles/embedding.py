"""embedding.safetensors: the token-embedding table [V, H] under the key `embedding`.

fp16 as the runtime requires; a float32 (debugging) rewrite writes float32 so that its verify
measures the graph, not the table's rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .. import graph as graphio

FILE = "embedding.safetensors"


def write_embedding(weight, source_dir: Path, out_dir: Path, np_float=np.float16, scale: float | None = None) -> str:
    """`weight` is the gs Constant of the Gather; read through a memory map, converted once."""
    proto = graphio.lazy_proto(weight)
    table = graphio.values_of(proto, source_dir) if proto is not None else np.asarray(weight.values)
    table = np.asarray(table, dtype=np.float32 if scale else None)
    if scale:
        table = table * np.float32(scale)
    save_file({"embedding": np.ascontiguousarray(table.astype(np_float))}, str(Path(out_dir) / FILE))
    return FILE
