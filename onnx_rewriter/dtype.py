"""Float dtype of the output graph: every float tensor becomes one type (fp16 for the runtime).

The runtime builds a strongly typed network, so op inputs must already agree. We convert every float
constant, Cast target and graph I/O to one type; large weights are converted later, one tensor at a
time, as they are written (graph.WeightWriter). The few tensors that must stay fp32 (RoPE table,
logits) are added by the target after this pass, with explicit Casts.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

FLOAT_NP = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64)}
FLOAT_PROTO = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}

NAMES = {"float16": onnx.TensorProto.FLOAT16, "float32": onnx.TensorProto.FLOAT}


def _is_float(dtype) -> bool:
    if dtype is None:
        return False
    try:
        return np.dtype(dtype) in FLOAT_NP or str(dtype) == "bfloat16"
    except TypeError:
        return False


def _narrow(values: np.ndarray, np_type) -> np.ndarray:
    """Cast, saturating at the type's finite range (mask fills like -3.4e38 must not become NaN later)."""
    info = np.finfo(np_type)
    return np.clip(values, info.min, info.max).astype(np_type)


def convert_graph(graph: gs.Graph, proto_type: int) -> None:
    np_type = onnx.helper.tensor_dtype_to_np_dtype(proto_type)
    keep_io = {t.name for t in graph.inputs + graph.outputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            if not isinstance(t._values, gs.ir.tensor.LazyValues) and _is_float(t.values.dtype):
                t.values = _narrow(np.asarray(t.values), np_type)
        elif t.name in keep_io:
            if _is_float(t.dtype):
                t.dtype = np_type
        else:
            # Intermediate types are re-derived by shape inference; stale ones would contradict.
            t.dtype, t.shape = None, None
    for node in graph.nodes:
        if node.op == "Cast" and node.attrs.get("to") in FLOAT_PROTO:
            node.attrs["to"] = proto_type
        if node.op in ("ConstantOfShape",) and isinstance(node.attrs.get("value"), gs.Constant):
            c = node.attrs["value"]
            if _is_float(c.values.dtype):
                node.attrs["value"] = gs.Constant(c.name, _narrow(np.asarray(c.values), np_type))
