"""bf16 exports (a checkpoint exported in its own dtype) read as fp32 graphs before anything matches.

The runtime has no bf16 (contract: bf16 -> fp16), and onnx-graphsurgeon has no numpy type for it (it
keeps the bare proto code 16), so the graph is widened once: Casts to bf16 become Casts to fp32 (and
then fold away as no-ops), bf16 graph I/O and small constants become fp32. Large weights stay lazy in
bf16 on disk; the writer converts them to the output type while writing, like any other weight.
After this the rewrite is the one of an fp32 export; its output is fp16 (or fp32) as asked.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .graph import SMALL_TENSOR_ELEMENTS, lazy_proto
from .stream import numel

BF16 = onnx.TensorProto.BFLOAT16


def _is_bf16(dtype) -> bool:
    return dtype is not None and (dtype == BF16 if isinstance(dtype, (int, np.integer)) else str(dtype) == "bfloat16")


def _widen_constant(c: gs.Constant) -> bool:
    t = lazy_proto(c)
    if t is not None:
        # larger weights are converted while being written
        if t.data_type != BF16 or numel(t) > SMALL_TENSOR_ELEMENTS or t.data_location == onnx.TensorProto.EXTERNAL:
            return False
        c.values = numpy_helper.to_array(t).astype(np.float32)
        return True
    vals = c.values  # an array in memory
    if _is_bf16(np.asarray(vals).dtype):
        c.values = np.asarray(vals).astype(np.float32)
        return True
    return False


def widen(graph: gs.Graph) -> int:
    """Retype bf16 to fp32 in place (large bf16 weights excepted); returns how many things changed."""
    n = 0
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            n += _widen_constant(t)
        elif _is_bf16(t.dtype):
            t.dtype = np.float32
            n += 1
    for node in graph.nodes:
        if node.op == "Cast" and node.attrs.get("to") == BF16:
            node.attrs["to"] = onnx.TensorProto.FLOAT
            n += 1
        for value in list(node.attrs.values()):
            if isinstance(value, gs.Constant) and _widen_constant(value):
                n += 1
    return n
