"""Shared by the RoPE patterns: the Cos/Sin(Concat(f, f)) head of a rope table, and reading inv_freq and
the positions off the angles f = positions · inv_freq in either form an exporter writes."""

import numpy as np

from onnx_rewriter.matching import RopeTable, check, const, expect, skip, split_const


def angles_mul(angles, at, what):
    """(inv_freq, positions) of f = Mul(Cast(Unsqueeze(positions)), inv_freq) (transformers 5)."""
    mul = expect(angles, "Mul", what, at)
    split = split_const(mul)
    check(split is not None, f"{what}: no constant inv_freq operand", mul)
    positions, inv = split
    return inv, skip(positions, ("Cast", "Unsqueeze"))


def angles_matmul(angles, at, what):
    """(inv_freq, positions) of f = Transpose(MatMul(inv_freq[None, :, None], positions[:, None, :]), (0, 2, 1))
    (transformers 4)."""
    tr = expect(angles, "Transpose", what, at)
    check(list(tr.attrs.get("perm", [])) == [0, 2, 1], f"{what}: Transpose is not (0,2,1)", tr)
    mm = expect(tr.inputs[0], "MatMul", what, tr)
    inv = const(skip(mm.inputs[0], ("Expand", "Cast", "Unsqueeze", "Reshape")))
    check(inv is not None, f"{what}: MatMul has no constant inv_freq operand", mm)
    return inv, skip(mm.inputs[1], ("Cast", "Unsqueeze"))


def positive_inv_freq(inv, at, what) -> np.ndarray:
    """inv_freq as a flat float64 vector; a zero or negative frequency is no RoPE."""
    inv = np.asarray(inv, dtype=np.float64).reshape(-1)
    check(inv.size >= 1 and np.all(inv > 0), f"{what}: inv_freq is not positive", at)
    return inv


def table_from_angles(cos_node, freqs):
    """`freqs(angles_tensor) -> (inv_freq, positions)` matches the form-specific part."""
    cat = expect(cos_node.inputs[0], "Concat", "rope table", cos_node)
    check(len(cat.inputs) == 2 and cat.inputs[0] is cat.inputs[1], "rope table: Concat is not (f, f)", cat)
    check(cat.attrs.get("axis") in (-1, 2), "rope table: Concat is not on the last axis", cat)
    sins = [n for n in cat.outputs[0].outputs if n.op == "Sin"]
    check(len(sins) == 1, "rope table: no Sin beside the Cos", cos_node)
    inv_freq, positions = freqs(cat.inputs[0])
    inv_freq = positive_inv_freq(inv_freq, cat, "rope table")
    table = RopeTable(inv_freq=inv_freq, positions=positions, cos=cos_node.outputs[0], sin=sins[0].outputs[0])
    return cos_node.outputs[0], table
