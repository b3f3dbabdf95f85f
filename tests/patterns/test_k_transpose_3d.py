"""k_transpose_3d: dynamo's sdpa k^T, Reshape([B*H, T, D]) -> Transpose(0, 2, 1) -> Reshape([B, H, D, T])."""

from __future__ import annotations

from tests.patterns.graphs import HKV, Builder, D, i64, node, reasons, result, run


def _sandwich(flat_shape=("BH", "S", D), out_shape=("B", HKV, D, "S"), lead=-1):
    b = Builder()
    k = b.input("k", ["B", HKV, "S", D])
    flat = b.op("Reshape", k, i64(lead, 0, D), shape=list(flat_shape))
    tr = b.op("Transpose", flat, perm=[0, 2, 1])
    kt = b.op("Reshape", tr, i64(0, HKV, D, -1), shape=list(out_shape))
    return b, k, flat, tr, kt


def _rejected(b, kt):
    return reasons(run(b.graph(kt)), "k_transpose", node(kt))


def test_matches():
    b, k, flat, tr, kt = _sandwich()
    assert result(run(b.graph(kt)), "k_transpose", node(kt)).k is k


def test_reshape_of_something_else():
    b, k, flat, tr, kt = _sandwich()
    node(kt).inputs[0] = flat
    assert _rejected(b, kt) == [f"k_transpose_3d: k^T sandwich: expected Transpose, found Reshape '{node(flat).name}'"]


def test_transpose_perm():
    b, k, flat, tr, kt = _sandwich()
    node(tr).attrs["perm"] = [1, 0, 2]
    assert _rejected(b, kt) == ["k_transpose_3d: k^T sandwich: Transpose is not (0,2,1)"]


def test_transpose_of_something_else():
    b, k, flat, tr, kt = _sandwich()
    node(tr).inputs[0] = b.input("k3", ["BH", "S", D])
    assert _rejected(b, kt) == ["k_transpose_3d: k^T sandwich: expected Reshape, found a graph input or constant"]


def test_ranks():
    b, k, flat, tr, kt = _sandwich(flat_shape=("B", HKV, "S", D))
    assert _rejected(b, kt) == ["k_transpose_3d: k^T sandwich: ranks are not 4 -> 3 -> 4"]


def test_head_dim_does_not_end_at_axis_minus_2():
    b, k, flat, tr, kt = _sandwich(out_shape=("B", HKV, 4, 2 * D))
    assert _rejected(b, kt) == [f"k_transpose_3d: k^T sandwich: head dim {D} does not end up at axis -2 (4)"]


def test_flat_reshape_fixes_the_batch():
    b, k, flat, tr, kt = _sandwich(lead=1)
    assert _rejected(b, kt) == ["k_transpose_3d: k^T sandwich: Reshape fixes B*H to 1"]
