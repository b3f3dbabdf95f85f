"""k_transpose_4d: k^T as one Transpose(0, 1, 3, 2)."""

from __future__ import annotations

from tests.patterns.graphs import HKV, Builder, D, node, reasons, result, run


def _kt(perm):
    b = Builder()
    k = b.input("k", ["B", HKV, "S", D])
    return b, k, b.op("Transpose", k, perm=perm)


def test_matches():
    b, k, kt = _kt([0, 1, 3, 2])
    assert result(run(b.graph(kt)), "k_transpose", node(kt)).k is k


def test_other_perm():
    b, k, kt = _kt([0, 2, 1, 3])
    assert reasons(run(b.graph(kt)), "k_transpose", node(kt)) == ["k_transpose_4d: k^T: perm is not (0,1,3,2)"]
