"""repeat_kv: Reshape(Expand(Unsqueeze(x, 2), [B, Hkv, G, T, D]), [B, Hkv·G, T, D])."""

from __future__ import annotations

import pytest

from tests.patterns.graphs import HKV, Builder, D, i64, node, reasons, repeat_kv, result, run


def _rep(groups=2):
    b = Builder()
    x = b.input("k", ["B", HKV, "S", D])
    return b, x, repeat_kv(b, x, groups)


@pytest.mark.parametrize("groups", [2, 3])
def test_matches_with_groups(groups):
    b, x, y = _rep(groups)
    m = result(run(b.graph(y)), "repeat_kv", node(y))
    assert m.x is x and m.groups == groups


def test_groups_unknown_when_heads_are_not_static():
    b, x, y = _rep()
    y.shape = ["B", "H", "S", D]
    assert result(run(b.graph(y)), "repeat_kv", node(y)).groups is None


def test_reshape_of_something_else():
    b, x, y = _rep()
    node(y).inputs[0] = x
    assert reasons(run(b.graph(y)), "repeat_kv", node(y)) == [
        "repeat_kv: repeat_kv: expected Expand, found a graph input or constant"]


def test_expand_of_something_else():
    b, x, y = _rep()
    node(node(y).inputs[0]).inputs[0] = x
    assert reasons(run(b.graph(y)), "repeat_kv", node(y)) == [
        "repeat_kv: repeat_kv: expected Unsqueeze, found a graph input or constant"]


def test_unsqueeze_not_on_axis_2():
    b, x, y = _rep()
    unsq = node(node(node(y).inputs[0]).inputs[0])
    unsq.inputs[1] = b.const(i64(1))
    assert reasons(run(b.graph(y)), "repeat_kv", node(y)) == ["repeat_kv: repeat_kv: Unsqueeze is not on axis 2"]
