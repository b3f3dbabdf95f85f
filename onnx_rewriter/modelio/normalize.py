"""Canonicalize a graph before matching: one form for what exporters write in several.

- Constant nodes become constant tensors; Identity and no-op Casts disappear;
- nodes whose inputs are all small constants are evaluated (shape arithmetic, slice bounds, scales);
- Shape of a tensor whose selected dims are static becomes a constant (TorchScript's side branches);
- back-to-back Transposes that cancel, and Reshape of a Reshape, collapse (also after the rewrite);
- Transpose of a weight on disk becomes that weight read transposed when it is written.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_rewriter.modelio import bfloat16, reshape_wildcard, stream
from onnx_rewriter.modelio.graph import (
    SMALL_TENSOR_ELEMENTS,
    const,
    lazy_proto,
    producer,
    quiet_import,
    to_lazy_constant,
)

log = logging.getLogger(__name__)

# Ops cheap and safe to evaluate at rewrite time when every input is a small constant.
FOLDABLE = {
    "Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal", "Pow", "Cast", "Concat", "Unsqueeze",
    "Squeeze", "Reshape", "Gather", "Slice", "Range", "Shape", "Equal", "Where", "Expand", "Transpose",
    "ConstantOfShape", "Less", "Greater", "Not", "And", "Or", "Max", "Min", "Floor", "Ceil", "Abs", "Size",
}
MAX_FOLD_ELEMENTS = SMALL_TENSOR_ELEMENTS  # what may be folded is what a loaded graph keeps inline


def replace_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of `old` read `new`; a graph output keeps its name by taking `new`'s place."""
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new
    if old in graph.outputs:
        idx = graph.outputs.index(old)
        ident = gs.Node("Identity", name=f"{old.name}_id", inputs=[new],
                        outputs=[gs.Variable(old.name, old.dtype, old.shape)])
        old.name = old.name + "_old"
        graph.nodes.append(ident)
        graph.outputs[idx] = ident.outputs[0]


def _evaluate(node: gs.Node, values: list[np.ndarray]) -> list[np.ndarray] | None:
    names = [f"i{k}" if t.name else "" for k, t in enumerate(node.inputs)]
    outs = [f"o{k}" for k in range(len(node.outputs))]
    attrs = {k: (numpy_helper.from_array(np.asarray(v.values)) if isinstance(v, gs.Constant) else v)
             for k, v in node.attrs.items()}
    try:
        proto = helper.make_node(node.op, names, outs, **attrs)
        inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                  for n, v in zip(names, values) if n]
        outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in outs]
        model = helper.make_model(helper.make_graph([proto], "fold", inputs, outputs),
                                  opset_imports=[helper.make_opsetid("", 21)])
        res = ReferenceEvaluator(model).run(None, {n: v for n, v in zip(names, values) if n})
    except Exception:  # leave anything the evaluator dislikes for the patterns to see
        return None
    return [np.asarray(r) for r in res]


def _shape_const(node: gs.Node) -> np.ndarray | None:
    shape = node.inputs[0].shape
    if shape is None:
        return None
    rank = len(shape)
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", rank)
    start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
    dims = list(shape)[max(start, 0):min(end, rank)]
    if all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims):
        return np.array(dims, dtype=np.int64)
    return None


def _gather_of_shape(node: gs.Node) -> np.ndarray | None:
    """Gather(Shape(x), k) when dim k of x is static, though other dims are not."""
    shp = producer(node.inputs[0])
    idx = const(node.inputs[1])
    if shp is None or shp.op != "Shape" or idx is None or shp.inputs[0].shape is None:
        return None
    shape = list(shp.inputs[0].shape)
    start = shp.attrs.get("start", 0)
    try:
        dims = [shape[start + int(i)] for i in idx.reshape(-1)]
    except IndexError:
        return None
    if all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims):
        return np.array(dims, dtype=np.int64).reshape(idx.shape)
    return None


def fold(graph: gs.Graph) -> int:
    """Evaluate what can be evaluated; returns how many nodes were folded."""
    folded = 0
    graph.toposort()
    for node in list(graph.nodes):
        if node.op == "Constant":
            val = node.attrs.get("value")
            if isinstance(val, gs.Constant):
                out = node.outputs[0]
                out.to_constant(np.asarray(val.values))
                node.outputs.clear()
                folded += 1
            continue
        if len(node.outputs) != 1:
            continue
        value = None
        if node.op == "Shape":
            value = _shape_const(node)
        elif node.op == "Gather" and producer(node.inputs[0]) is not None and producer(node.inputs[0]).op == "Shape":
            value = _gather_of_shape(node)
        if value is None and node.op in FOLDABLE and node.op != "Shape":
            vals = [const(t) if t.name else np.array([]) for t in node.inputs]
            if all(v is not None for v in vals) and all(v.size <= MAX_FOLD_ELEMENTS for v in vals):
                res = _evaluate(node, [v for v in vals])
                if res is not None and res[0].size <= MAX_FOLD_ELEMENTS:
                    value = res[0]
        if value is not None:
            out = node.outputs[0]
            if out in graph.outputs:
                continue
            out.to_constant(np.asarray(value))
            node.outputs.clear()
            folded += 1
    graph.cleanup()
    return folded


def fold_weight_transposes(graph: gs.Graph) -> int:
    """Transpose(weight in external data) -> a constant that the writer reads transposed (stream.chunks).

    `make export` leaves the checkpoint's weights untransposed so that the baseline can point into the
    checkpoint (export.py, checkpoint_refs.py); this gives its rewrite the output a folded export gets,
    without holding a weight in memory (the writer reads it through a memory map).
    """
    n = 0
    for node in graph.nodes:
        if node.op != "Transpose" or not node.outputs or node.outputs[0] in graph.outputs:
            continue
        src = node.inputs[0]
        proto = lazy_proto(src) if isinstance(src, gs.Constant) else None
        if proto is None or proto.data_location != onnx.TensorProto.EXTERNAL or stream.transposed(proto) is not None:
            continue
        if len(src.outputs) != 1:  # tied weights (embedding = lm_head) keep their Transpose, as onnxscript does
            continue
        perm = list(node.attrs.get("perm", range(len(proto.dims) - 1, -1, -1)))
        folded = onnx.TensorProto()
        folded.CopyFrom(proto)  # external: only the location, not the data
        folded.name = node.outputs[0].name
        del folded.dims[:]
        folded.dims.extend(proto.dims[p] for p in perm)
        folded.doc_string = stream.TRANSPOSED + ",".join(map(str, perm))
        to_lazy_constant(node.outputs[0], folded)
        node.outputs.clear()
        n += 1
    if n:
        graph.cleanup()
    return n


def _bypass(graph: gs.Graph, node: gs.Node) -> bool:
    out = node.outputs[0]
    if out in graph.outputs and node.inputs[0] in graph.inputs:
        return False
    replace_uses(graph, out, node.inputs[0])
    node.outputs.clear()
    return True


def simplify(graph: gs.Graph) -> int:
    """Drop Identity and no-op Casts; collapse Transpose∘Transpose and Reshape∘Reshape."""
    changed = 0
    for node in list(graph.nodes):
        if not node.outputs:
            continue
        if node.op == "Identity":
            changed += _bypass(graph, node)
        elif node.op == "Cast":
            src = node.inputs[0]
            to = node.attrs["to"]
            want = helper.tensor_dtype_to_np_dtype(to) if to != onnx.TensorProto.BFLOAT16 else None
            if src.dtype is not None and want is not None and np.dtype(src.dtype) == want:
                changed += _bypass(graph, node)
        elif node.op == "Transpose":
            prev = producer(node.inputs[0])
            if prev is not None and prev.op == "Transpose":
                p1, p2 = prev.attrs.get("perm"), node.attrs.get("perm")
                if p1 is not None and p2 is not None and [p1[i] for i in p2] == list(range(len(p2))):
                    changed += _bypass_to(graph, node, prev.inputs[0])
        elif node.op == "Reshape":
            prev = producer(node.inputs[0])
            target = const(node.inputs[1])
            if prev is not None and prev.op == "Reshape" and target is not None and 0 not in target.tolist():
                node.inputs[0] = prev.inputs[0]
                changed += 1
    graph.cleanup()
    return changed


def _bypass_to(graph: gs.Graph, node: gs.Node, src: gs.Tensor) -> bool:
    out = node.outputs[0]
    if out in graph.outputs:
        return False
    replace_uses(graph, out, src)
    node.outputs.clear()
    return True


def infer_shapes(graph: gs.Graph) -> gs.Graph:
    """Re-run ONNX shape inference (weights stay lazy: gs exports their protos as they are)."""
    model = gs.export_onnx(graph, do_type_check=False)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        log.debug("shape inference failed: %s", exc)
        return graph
    return quiet_import(model)


def normalize(graph: gs.Graph, reinfer: bool = False, weight_transposes: bool = False) -> gs.Graph:
    """Fold and simplify; with `reinfer`, shapes made static by folding are propagated and folded again.

    `weight_transposes`: fold Transpose(weight) too (before matching only: the dtype pass, which runs
    later, must see the folded weights)."""
    bfloat16.widen(graph)  # a bf16 export reads as an fp32 one
    n_fold = fold(graph) + (fold_weight_transposes(graph) if weight_transposes else 0)
    n_simp = simplify(graph)
    if reinfer and n_fold:
        graph = infer_shapes(graph)
        n_fold += fold(graph)
        n_simp += simplify(graph)
    if reinfer and reshape_wildcard.resolve(graph):  # TorchScript's view(B, S, -1, D): heads become static
        graph = infer_shapes(graph)
        n_fold += fold(graph)
        n_simp += simplify(graph)
    # No toposort here: fold() sorted the graph and simplify() only bypasses nodes, which keeps the order.
    log.debug("normalize: %d folded, %d simplified", n_fold, n_simp)
    return graph
