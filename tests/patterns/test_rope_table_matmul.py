"""rope_table_matmul: the transformers-4 angles, Transpose(MatMul(inv_freq[None, :, None], positions))."""

from __future__ import annotations

import numpy as np

from tests.patterns.graphs import INV_FREQ, Builder, node, reasons, result, rope_table_matmul, run


def _table():
    b = Builder()
    pos = b.input("position_ids", ["B", "S"], np.int64)
    return b, pos, rope_table_matmul(b, pos)


def _rejected(b, t):
    return reasons(run(b.graph(t.cos, t.sin)), "rope_table", node(t.cos))


def test_matches_inv_freq_and_positions():
    b, pos, t = _table()
    table = result(run(b.graph(t.cos, t.sin)), "rope_table", node(t.cos))
    np.testing.assert_allclose(table.inv_freq, INV_FREQ, rtol=0)
    assert table.positions is pos and table.cos is t.cos and table.sin is t.sin


def test_transpose_perm():
    b, pos, t = _table()
    node(t.f).attrs["perm"] = [0, 1, 2]
    assert _rejected(b, t)[0] == "rope_table_matmul: rope angles: Transpose is not (0,2,1)"


def test_transpose_of_something_else():
    b, pos, t = _table()
    node(t.f).inputs[0] = b.input("angles", ["B", 4, "S"])
    assert _rejected(b, t)[0] == "rope_table_matmul: rope angles: expected MatMul, found a graph input or constant"


def test_no_constant_inv_freq():
    b, pos, t = _table()
    node(t.mm).inputs[0] = b.input("inv", [1, 4, 1])
    assert _rejected(b, t) == ["rope_table_matmul: rope angles: MatMul has no constant inv_freq operand",
                               f"rope_table_mul: rope angles: expected Mul, found Transpose '{node(t.f).name}'"]


def test_inv_freq_not_positive():
    b = Builder()
    pos = b.input("position_ids", ["B", "S"], np.int64)
    t = rope_table_matmul(b, pos, -INV_FREQ)
    assert _rejected(b, t)[0] == "rope_table_matmul: rope table: inv_freq is not positive"
