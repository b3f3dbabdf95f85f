"""Resolve the -1 of run-time Reshape targets whose value the symbolic shapes already fix.

TorchScript writes `view(B, S, -1, D)` as `Reshape(x[B, S, H·D], Concat(B', S', [-1], [D]))`, with B' and
S' read from Shape(x) at run time. ONNX shape inference keeps B and S as symbols but cannot solve the
-1 (it would need the symbols' values), so the head count stays unknown and nothing downstream is
static. Here the symbols cancel: every symbol of the output also appears in the input, and what is
left is a ratio of static dims. The -1 becomes that number, which is what it evaluates to for every
input the graph accepts.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnx_rewriter.modelio.graph import const, producer

log = logging.getLogger(__name__)


def _static(d) -> bool:
    return isinstance(d, (int, np.integer)) and d >= 0


def _solve(in_shape, out_shape, idx) -> int | None:
    """The value of out_shape[idx] when the other output dims cancel against the input's."""
    if in_shape is None or out_shape is None or idx >= len(out_shape):
        return None
    others = [d for i, d in enumerate(out_shape) if i != idx]
    if any(not _static(d) and not isinstance(d, str) for d in list(in_shape) + others):
        return None
    sym_in = Counter(d for d in in_shape if isinstance(d, str))
    sym_out = Counter(d for d in others if isinstance(d, str))
    if sym_in != sym_out:  # every symbol must cancel, or the ratio depends on run-time values
        return None
    num = int(np.prod([int(d) for d in in_shape if _static(d)], dtype=np.int64))
    den = int(np.prod([int(d) for d in others if _static(d)], dtype=np.int64))
    if den <= 0 or num % den:
        return None
    return num // den


def resolve(graph: gs.Graph) -> int:
    """Replace solvable -1 entries of Concat-built Reshape targets by constants; returns how many."""
    done = 0
    for node in list(graph.nodes):
        if node.op != "Reshape":
            continue
        cat = producer(node.inputs[1])
        if cat is None or cat.op != "Concat":
            continue
        pos, where = 0, None
        for k, part in enumerate(cat.inputs):
            n = part.shape[0] if part.shape is not None and len(part.shape) == 1 else None
            if not _static(n):
                where = None
                break
            v = const(part)
            if v is not None and -1 in v.reshape(-1).tolist():
                where = (k, pos + v.reshape(-1).tolist().index(-1), v.reshape(-1))
            pos += int(n)
        if where is None:
            continue
        k, idx, v = where
        out_shape = node.outputs[0].shape
        if out_shape is not None and idx < len(out_shape) and _static(out_shape[idx]):
            continue  # inference already solved it (dynamo exports)
        value = _solve(node.inputs[0].shape, node.outputs[0].shape, idx)
        if value is None:
            continue
        new = v.copy()
        new[list(v).index(-1)] = value
        # A Concat of its own: one target is often shared by the q, k and v Reshapes (other head counts).
        parts = list(cat.inputs)
        parts[k] = gs.Constant(f"{node.name}/resolved_shape_part", np.asarray(new, dtype=v.dtype))
        out = gs.Variable(f"{node.name}/resolved_shape", dtype=np.int64, shape=list(node.inputs[1].shape or []) or None)
        graph.nodes.append(gs.Node("Concat", name=f"{node.name}/resolved_shape_concat", inputs=parts, outputs=[out],
                                   attrs=dict(cat.attrs)))
        node.inputs[1] = out
        done += 1
    if done:
        graph.toposort()  # shape inference reads nodes in order: the new Concats go before their Reshapes
        log.debug("resolved %d Reshape -1 targets from symbolic shapes", done)
    return done
