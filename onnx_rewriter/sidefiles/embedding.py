"""embedding.safetensors: the token-embedding table [V, H] under the key `embedding`.

fp16 as the runtime requires; a float32 (debugging) rewrite writes float32 so that its verify
measures the graph, not the table's rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..modelio import graph as graphio
from ..modelio import stream

FILE = "embedding.safetensors"


def write_embedding(weight, source_dir: Path, out_dir: Path, np_float=np.float16, scale: float | None = None,
                    progress=None) -> str:
    """`weight` is the gs Constant of the Gather; streamed from its source in chunks, converted on the way
    (a 0.5B model's fp32 table is 545 MB: reading it whole would double the rewrite's peak memory)."""
    proto = graphio.lazy_proto(weight)
    if proto is None:  # an in-memory constant (small graphs): wrap it so one code path writes both
        proto = numpy_helper.from_array(np.ascontiguousarray(weight.values), "embedding")
    want = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(np_float))
    stream.write_safetensors(Path(out_dir) / FILE, "embedding", proto, source_dir, want, scale=scale, progress=progress)
    return FILE
