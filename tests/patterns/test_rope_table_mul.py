"""rope_table_mul (and the Cos/Sin head shared with rope_table_matmul, patterns/_rope_common.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.patterns.graphs import INV_FREQ, Builder, node, reasons, result, rope_table_mul, run


def _table(inv=INV_FREQ):
    b = Builder()
    pos = b.input("position_ids", ["B", "S"], np.int64)
    t = rope_table_mul(b, pos, inv)
    return b, pos, t


def _run(b, t):
    return run(b.graph(t.cos, t.sin))


def test_matches_inv_freq_and_positions():
    b, pos, t = _table()
    table = result(_run(b, t), "rope_table", node(t.cos))
    np.testing.assert_allclose(table.inv_freq, INV_FREQ, rtol=0)
    assert table.positions is pos and table.cos is t.cos and table.sin is t.sin
    assert table.attention_scaling == 1.0


def test_inv_freq_operand_on_either_side():
    b, pos, t = _table()
    mul = node(t.f)
    mul.inputs.reverse()
    assert result(_run(b, t), "rope_table", node(t.cos)).positions is pos


def _rejected(b, t):
    return reasons(_run(b, t), "rope_table", node(t.cos))


def test_concat_is_not_f_f():
    b, pos, t = _table()
    node(t.cat).inputs[1] = b.const(np.zeros(4, np.float32))
    assert _rejected(b, t) == ["rope_table_matmul: rope table: Concat is not (f, f)",
                               "rope_table_mul: rope table: Concat is not (f, f)"]


def test_concat_not_on_last_axis():
    b, pos, t = _table()
    node(t.cat).attrs["axis"] = 1
    assert _rejected(b, t)[1] == "rope_table_mul: rope table: Concat is not on the last axis"


def test_no_sin_beside_the_cos():
    b, pos, t = _table()
    node(t.sin).op = "Tanh"
    assert _rejected(b, t)[1] == "rope_table_mul: rope table: no Sin beside the Cos"


def test_cos_of_something_else():
    b = Builder()
    x = b.input("x", ["B", "S", 8])
    cos = b.op("Cos", x)
    assert reasons(run(b.graph(cos)), "rope_table", node(cos)) == [
        "rope_table_matmul: rope table: expected Concat, found a graph input or constant",
        "rope_table_mul: rope table: expected Concat, found a graph input or constant"]


def test_angles_not_a_mul():
    b, pos, t = _table()
    node(t.f).op = "Add"
    name = node(t.f).name
    assert _rejected(b, t) == [f"rope_table_matmul: rope angles: expected Transpose, found Add '{name}'",
                               f"rope_table_mul: rope angles: expected Mul, found Add '{name}'"]


def test_no_constant_inv_freq():
    b, pos, t = _table()
    node(t.f).inputs[1] = b.input("inv", [4])
    assert _rejected(b, t)[1] == "rope_table_mul: rope angles: no constant inv_freq operand"


@pytest.mark.parametrize("bad", [np.array([1.0, 0.0, 0.1, 0.01], np.float32), np.array([], np.float32)])
def test_inv_freq_not_positive(bad):
    b, pos, t = _table(bad)
    assert _rejected(b, t)[1] == "rope_table_mul: rope table: inv_freq is not positive"
