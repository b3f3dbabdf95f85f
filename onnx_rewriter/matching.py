"""Small helpers patterns use to walk a graphsurgeon graph and to say why a match failed."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs


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


def check(cond, reason: str, node: gs.Node | None = None) -> None:
    if not cond:
        raise Reject(reason, node)


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t is not None and len(t.inputs) == 1 else None


def expect(t: gs.Tensor, op: str | tuple[str, ...], what: str, at: gs.Node | None = None) -> gs.Node:
    """The node producing `t`, which must be `op` (or one of several ops)."""
    ops = (op,) if isinstance(op, str) else op
    node = producer(t)
    if node is None or node.op not in ops:
        found = "a graph input or constant" if node is None else f"{node.op} '{node.name}'"
        raise Reject(f"{what}: expected {'/'.join(ops)}, found {found}", at or node)
    return node


def const(t: gs.Tensor) -> np.ndarray | None:
    """Values of a small constant tensor, or None (large weights stay lazy and are never read here)."""
    if isinstance(t, gs.Constant):
        vals = t._values
        if isinstance(vals, gs.ir.tensor.LazyValues) and vals.tensor.data_location == 1:
            return None
        return np.asarray(t.values)
    return None


def scalar(t: gs.Tensor) -> float | None:
    v = const(t)
    if v is None or v.size != 1:
        return None
    return float(v.reshape(()))


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
