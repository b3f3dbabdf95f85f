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

from onnx_rewriter.modelio import stream
from onnx_rewriter.modelio.graph import FLOAT_TYPES, SMALL_TENSOR_ELEMENTS, is_lazy, lazy_proto
from onnx_rewriter.modelio.stream import numel

FLOAT_NP = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64)}
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


def convert_graph(graph: gs.Graph, proto_type: int) -> set[str]:
    """Narrow every float tensor to `proto_type`. Returns the names of the large weights whose
    conversion is deferred to the writer (they stay on disk until then)."""
    np_type = onnx.helper.tensor_dtype_to_np_dtype(proto_type)
    keep_io = {t.name for t in graph.inputs + graph.outputs}
    deferred = set()
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            lazy = lazy_proto(t)
            if lazy is not None and lazy.data_type in FLOAT_TYPES and lazy.data_type != proto_type:
                # large or on disk: converted while being written
                on_disk = lazy.data_location == onnx.TensorProto.EXTERNAL
                if numel(lazy) > SMALL_TENSOR_ELEMENTS or on_disk or stream.derived(lazy):  # derived: computed too
                    deferred.add(t.name)
                    continue
                t.values = np.asarray(t.values)  # small and inline: materialize, then narrow below
            if not is_lazy(t) and _is_float(t.values.dtype):
                t.values = _narrow(np.asarray(t.values), np_type)
                if t.values.ndim >= 2 and np_type == np.float16:  # a weight (not a mask fill): said if off
                    stream.note_nonfinite(t.name, t.values)
        elif t.name in keep_io:
            if _is_float(t.dtype):
                t.dtype = np_type
        else:
            # Intermediate types are re-derived by shape inference; stale ones would contradict.
            t.dtype, t.shape = None, None
    for node in graph.nodes:
        if node.op == "Cast" and node.attrs.get("to") in FLOAT_TYPES:
            node.attrs["to"] = proto_type
        if node.op in ("ConstantOfShape",) and isinstance(node.attrs.get("value"), gs.Constant):
            c = node.attrs["value"]
            if _is_float(c.values.dtype):
                node.attrs["value"] = gs.Constant(c.name, _narrow(np.asarray(c.values), np_type))
    return deferred


def keep_fp32(graph: gs.Graph, cores: list) -> int:
    """Run each RMSNorm core (x -> x·rsqrt(mean(x²)+eps)) in fp32 between explicit Casts.

    `cores`: matching.results.RMSNormCore matches. Called after `convert_graph` narrowed everything; the
    cores' constants are widened back. The entry tensor is read off the live graph (the embedding step may
    have replaced the matched one). Returns how many islands were made.
    """
    n = 0
    for core in cores:
        first, last = core.nodes[0], core.nodes[-1]
        if not last.outputs or not last.outputs[0].outputs:
            continue
        n += 1
        name = last.name
        x = first.inputs[0]
        while x.inputs and x.inputs[0].op == "Cast":
            x = x.inputs[0].inputs[0]
        x32 = gs.Variable(f"{name}/x_fp32", dtype=np.float32)
        graph.nodes.append(gs.Node("Cast", name=f"{name}/to_fp32", inputs=[x], outputs=[x32],
                                   attrs={"to": onnx.TensorProto.FLOAT}))
        inside = set(id(nd) for nd in core.nodes)
        for nd in core.nodes:
            for i, t in enumerate(nd.inputs):
                src = t.inputs[0] if t.inputs else None
                if isinstance(t, gs.Constant):
                    if not is_lazy(t) and _is_float(t.values.dtype):
                        nd.inputs[i] = gs.Constant(f"{name}/c{i}_{nd.op}_fp32", np.asarray(t.values, dtype=np.float32))
                elif src is None or id(src) not in inside:
                    nd.inputs[i] = x32  # the entry (x, or a Cast of x the export kept)
        out = last.outputs[0]
        out16 = gs.Variable(f"{name}/out_fp16")
        for user in list(out.outputs):
            for i, t in enumerate(user.inputs):
                if t is out:
                    user.inputs[i] = out16
        graph.nodes.append(gs.Node("Cast", name=f"{name}/to_fp16", inputs=[out], outputs=[out16],
                                   attrs={"to": onnx.TensorProto.FLOAT16}))
    return n
