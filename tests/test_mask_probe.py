"""The mask probe on hand-built masks: causal and causal sliding windows are read (None / W); anything the
plugin cannot reproduce (bidirectional, prefix-LM, anti-causal, a window that is not causal) is refused,
naming the layer. The real exports behind the window rows are verified end to end in test_coverage.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnx_rewriter.analysis.mask_probe import MaskProbe
from onnx_rewriter.errors import PatternMismatch


def _mask_graph(rule):
    """input_ids [1, S] -> positions 0..S-1 -> mask [1, 1, S, S] (0 allowed, -inf not) from rule(q, k, const)."""
    ids = gs.Variable("input_ids", np.int64, [1, "s"])
    nodes, n = [], [0]

    def node(op, inputs, attrs=None, dtype=None):
        n[0] += 1
        out = gs.Variable(f"t{n[0]}", dtype=dtype)
        nodes.append(gs.Node(op, inputs=list(inputs), outputs=[out], attrs=attrs or {}))
        return out

    def const(v):
        n[0] += 1
        return gs.Constant(f"c{n[0]}", np.asarray(v, dtype=np.int64))

    length = node("Gather", [node("Shape", [ids], dtype=np.int64), const(1)], {"axis": 0}, np.int64)
    pos = node("Range", [const(0), length, const(1)], dtype=np.int64)
    q = node("Unsqueeze", [pos, const([1])], dtype=np.int64)
    k = node("Unsqueeze", [pos, const([0])], dtype=np.int64)
    allowed = rule(node, q, k, const)
    zero, neg = (gs.Constant(f"f{v}", np.asarray(v, np.float32)) for v in (0.0, -np.inf))
    mask = node("Unsqueeze", [node("Where", [allowed, zero, neg], dtype=np.float32), const([0, 1])], dtype=np.float32)
    graph = gs.Graph(nodes=nodes, inputs=[ids], outputs=[mask, pos], opset=20, ir_version=10)
    return graph, SimpleNamespace(index=3, mask=mask, rope=SimpleNamespace(positions=pos))


def causal(node, q, k, c):
    return node("LessOrEqual", [k, q], dtype=np.bool_)


def window(w):
    def rule(node, q, k, c):
        return node("And", [causal(node, q, k, c), node("Less", [node("Sub", [q, k], dtype=np.int64), c(w)],
                                                             dtype=np.bool_)], dtype=np.bool_)
    return rule


def bidirectional(node, q, k, c):
    return node("GreaterOrEqual", [node("Add", [q, k], dtype=np.int64), c(0)], dtype=np.bool_)


def prefix_lm(node, q, k, c):  # the first 4 tokens see each other; the rest is causal
    return node("Or", [causal(node, q, k, c), node("Less", [k, c(4)], dtype=np.bool_)], dtype=np.bool_)


def anti_causal(node, q, k, c):
    return node("GreaterOrEqual", [k, q], dtype=np.bool_)


def window_not_causal(node, q, k, c):  # |q - k| < 8: a band that also looks ahead
    return node("Less", [node("Abs", [node("Sub", [q, k], dtype=np.int64)], dtype=np.int64), c(8)], dtype=np.bool_)


@pytest.mark.parametrize("rule,want", [(causal, None), (window(8), 8), (window(1), 1), (window(100), 100)],
                         ids=["causal", "window8", "window1", "window100"])
def test_causal_and_windows_are_read(rule, want):
    graph, layer = _mask_graph(rule)
    assert MaskProbe(graph, None).window_of(layer) == want


@pytest.mark.parametrize("rule", [bidirectional, prefix_lm, anti_causal, window_not_causal],
                         ids=["bidirectional", "prefix-lm", "anti-causal", "band"])
def test_masks_the_plugin_cannot_run_are_refused(rule):
    graph, layer = _mask_graph(rule)
    with pytest.raises(PatternMismatch, match=r"^layer 3: the attention mask is neither causal nor a causal "
                                              r"sliding window \(probe with \d+ tokens\)"):
        MaskProbe(graph, None).window_of(layer)
