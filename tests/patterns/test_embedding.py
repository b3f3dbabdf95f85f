"""embedding: Gather(W[V, H], input_ids) on axis 0, W a weight, the ids a graph input."""

from __future__ import annotations

import numpy as np
import pytest

from tests.patterns.graphs import Builder, node, reasons, result, run


def _lookup(ids_name="input_ids", axis=0, table=None):
    table = np.zeros((32, 8), np.float32) if table is None else table
    b = Builder()
    ids = b.input(ids_name, ["B", "S"], np.int64)
    w = b.const(table)
    return b, ids, w, b.op("Gather", w, ids, axis=axis)


def _rejected(b, y):
    return reasons(run(b.graph(y)), "embedding", node(y))


def test_matches():
    b, ids, w, y = _lookup()
    m = result(run(b.graph(y)), "embedding", node(y))
    assert m.weight is w and m.ids is ids


def test_not_axis_0():
    b, ids, w, y = _lookup(axis=1)
    assert _rejected(b, y) == ["embedding: embedding: Gather is not on axis 0"]


def test_table_not_2d():
    b, ids, w, y = _lookup(table=np.zeros((32,), np.float32))
    assert _rejected(b, y) == ["embedding: embedding: table is not a 2-D weight"]


def test_table_computed():
    b, ids, w, y = _lookup()
    node(y).inputs[0] = b.op("Neg", w)
    assert _rejected(b, y) == ["embedding: embedding: table is not a 2-D weight"]


def test_indices_not_a_graph_input():
    b, ids, w, y = _lookup()
    node(y).inputs[1] = b.op("Abs", ids)
    assert _rejected(b, y) == ["embedding: embedding: indices are not a graph input"]


@pytest.mark.parametrize("name", ["attention_mask", "position_ids", "cache_position"])
def test_lookup_of_mask_or_positions(name):
    b, ids, w, y = _lookup(ids_name=name)
    assert _rejected(b, y) == [f"embedding: embedding: Gather reads '{name}', not the token ids"]
