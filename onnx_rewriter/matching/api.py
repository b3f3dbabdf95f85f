"""The pattern author's API: walk a graphsurgeon graph, say why a match failed, describe what matched.

A pattern module imports from here only: the failure types (`Reject`, `Refuse`), the walking helpers
and the result types it returns (defined in `matching/results.py`, re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnx_rewriter.matching.results import (
    AttentionCore,
    AttentionLayer,
    KTranspose,
    KVCacheConcat,
    MoeBlock,
    QKNorm,
    RepeatKV,
    RMSNormCore,
    RopeApply,
    RopeTable,
    TokenEmbedding,
    VitAttention,
    VitRope,
    mrope_axes,
)
from onnx_rewriter.modelio.graph import const, producer

__all__ = [
    "Reject", "Refuse", "check", "producer", "expect", "const", "scalar", "is_weight", "attr", "split_const",
    "peel_scale", "skip", "static_dim", "slice_bounds", "rope_cos_operand", "rope_sin_operand", "run_subgraph",
    "CASTS",
    "AttentionCore", "AttentionLayer", "KTranspose", "KVCacheConcat", "MoeBlock", "QKNorm", "RepeatKV", "RMSNormCore",
    "RopeApply", "RopeTable", "TokenEmbedding", "VitAttention", "VitRope", "mrope_axes",
]

CASTS = ("Cast",)  # the pass-through most patterns look through


class Reject(Exception):
    """A pattern's check failed: `reason` says which, `node` where."""

    def __init__(self, reason: str, node: gs.Node | None = None):
        super().__init__(reason)
        self.reason = reason
        self.node = node

    def where(self) -> str:
        if self.node is None:
            return ""
        return f" at {self.node.op} node '{self.node.name}'"


class Refuse(Reject):
    """The pattern understood the subgraph and knows the runtime cannot run it: stop, don't guess."""


def check(cond, reason: str, node: gs.Node | None = None) -> None:
    if not cond:
        raise Reject(reason, node)


def expect(t: gs.Tensor, op: str | tuple[str, ...], what: str, at: gs.Node | None = None) -> gs.Node:
    """The node producing `t`, which must be `op` (or one of several ops)."""
    ops = (op,) if isinstance(op, str) else op
    node = producer(t)
    if node is None or node.op not in ops:
        found = "a graph input or constant" if node is None else f"{node.op} '{node.name}'"
        raise Reject(f"{what}: expected {'/'.join(ops)}, found {found}", at or node)
    return node


def scalar(t: gs.Tensor) -> float | None:
    v = const(t)
    if v is None or v.size != 1:
        return None
    return float(v.reshape(()))


def is_weight(t: gs.Tensor) -> bool:
    """A constant tensor (inline or still on disk), not something computed."""
    return isinstance(t, gs.Constant)


def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def split_const(node: gs.Node) -> tuple[gs.Tensor, np.ndarray] | None:
    """For a binary node with one small-constant operand: (other operand, constant)."""
    a, b = node.inputs[0], node.inputs[1]
    ca, cb = const(a), const(b)
    if cb is not None and ca is None:
        return a, cb
    if ca is not None and cb is None:
        return b, ca
    return None


def peel_scale(t: gs.Tensor, through: Iterable[str] = CASTS) -> tuple[gs.Tensor, float]:
    """Walk up through Mul / Div by scalar constants (and `through` ops): (inner tensor, product of scales)."""
    scale = 1.0
    while True:
        t = skip(t, through)
        n = producer(t)
        split = split_const(n) if n is not None and n.op in ("Mul", "Div") else None
        if split is None or split[1].size != 1 or (n.op == "Div" and split[0] is not n.inputs[0]):
            return t, scale
        t, c = split[0], float(split[1].reshape(()))
        scale = scale * c if n.op == "Mul" else scale / c


def skip(t: gs.Tensor, ops: Iterable[str]) -> gs.Tensor:
    """Walk up through single-input pass-through ops (Cast, Identity, ...)."""
    ops = set(ops)
    while (n := producer(t)) is not None and n.op in ops:
        t = n.inputs[0]
    return t


def static_dim(t: gs.Tensor, axis: int) -> int | None:
    shape = t.shape
    if shape is None or len(shape) <= abs(axis) - (1 if axis < 0 else 0) or axis >= len(shape):
        return None
    d = shape[axis]
    return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None


def slice_bounds(node: gs.Node) -> tuple[int, int, int, int] | None:
    """(start, end, axis, step) of a Slice with constant bounds on one axis."""
    ins = node.inputs
    vals = [const(t) if i < len(ins) and ins[i].name else None for i, t in enumerate(ins[1:5], 1)]
    start, end = vals[0], vals[1]
    axes = vals[2] if len(vals) > 2 else None
    steps = vals[3] if len(vals) > 3 else None
    if start is None or end is None or start.size != 1 or end.size != 1:
        return None
    axis = int(axes.reshape(-1)[0]) if axes is not None else 0
    step = int(steps.reshape(-1)[0]) if steps is not None else 1
    return int(start.reshape(-1)[0]), int(end.reshape(-1)[0]), axis, step


def rope_cos_operand(add: gs.Node, cos_of: Callable[[gs.Tensor], Any]) -> tuple[gs.Tensor, Any, gs.Node] | None:
    """rotate_half RoPE is Add(Mul(x, cos'), Mul(rotate_half(x), sin')), each of the four operand orders
    possible. For `add` of two Muls: (x, what `cos_of` found, the sin Mul) for the first operand (first
    Mul first, second operand first) where `cos_of(operand)` is not None; None when none reads a cos table."""
    muls = [producer(i) for i in add.inputs]
    for cos_mul, sin_mul in (muls, muls[::-1]):
        for xi in (0, 1):
            found = cos_of(cos_mul.inputs[1 - xi])
            if found is not None:
                return cos_mul.inputs[xi], found, sin_mul
    return None


def rope_sin_operand(sin_mul: gs.Node, sin_of: Callable[[gs.Tensor], Any]) -> tuple[gs.Tensor, Any] | None:
    """The other half of `rope_cos_operand`: (rotate_half(x), what `sin_of` found) for the first operand of
    `sin_mul` (the second first) where `sin_of(operand)` is not None; None when neither reads the sin table."""
    for ri in (0, 1):
        found = sin_of(sin_mul.inputs[1 - ri])
        if found is not None:
            return sin_mul.inputs[ri], found
    return None


def run_subgraph(graph: gs.Graph, outputs: list[gs.Tensor], feeds: list[tuple[gs.Tensor, np.ndarray]]):
    """Run the nodes between `feeds` ((tensor, array) pairs, any tensors) and `outputs` in onnxruntime, for
    patterns that read by numbers what a small data-movement subgraph does. Every other leaf must be a
    small constant (Reject otherwise). Returns the output arrays."""
    import onnx
    import onnxruntime as ort

    fed = {id(t) for t, _ in feeds}
    nodes, seen, stack = [], set(), list(outputs)
    while stack:
        t = stack.pop()
        if id(t) in seen or id(t) in fed:
            continue
        seen.add(id(t))
        if isinstance(t, gs.Constant):
            check(const(t) is not None, f"subgraph reads the large weight '{t.name}'")
            continue
        check(bool(t.inputs), f"subgraph reads '{t.name}', which is not fed")
        n = t.inputs[0]
        if id(n) not in seen:
            seen.add(id(n))
            nodes.append(n)
            stack.extend(x for x in n.inputs if x.name)
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    nodes.sort(key=lambda n: order.get(id(n), -1))
    sub = gs.Graph(nodes=nodes, inputs=[t for t, _ in feeds], outputs=list(outputs), opset=graph.opset,
                   import_domains=graph.import_domains, ir_version=graph.ir_version)
    model = gs.export_onnx(sub, do_type_check=False)
    del model.graph.value_info[:]
    for vi, (t, v) in zip(model.graph.input, feeds):  # the fed arrays' types, whatever the graph says
        vi.CopyFrom(onnx.helper.make_tensor_value_info(t.name, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), None))
    for o in model.graph.output:
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return sess.run([t.name for t in outputs], {t.name: v for t, v in feeds})
    except Exception as exc:  # onnxruntime's own error types: the subgraph is not what the caller expects
        raise Reject(f"subgraph cannot be evaluated ({str(exc).splitlines()[0][:120]})", outputs[0].inputs[0]
                     if outputs[0].inputs else None) from None
