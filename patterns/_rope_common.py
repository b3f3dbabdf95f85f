"""Shared by the rope_table patterns: the Cos/Sin(Concat(f, f)) head common to every form."""

import numpy as np

from onnx_rewriter.layers import RopeTable
from onnx_rewriter.matching import check, expect


def table_from_angles(cos_node, freqs):
    """`freqs(angles_tensor) -> (inv_freq, positions, nodes)` matches the form-specific part."""
    cat = expect(cos_node.inputs[0], "Concat", "rope table", cos_node)
    check(len(cat.inputs) == 2 and cat.inputs[0] is cat.inputs[1], "rope table: Concat is not (f, f)", cat)
    check(cat.attrs.get("axis") in (-1, 2), "rope table: Concat is not on the last axis", cat)
    sins = [n for n in cat.outputs[0].outputs if n.op == "Sin"]
    check(len(sins) == 1, "rope table: no Sin beside the Cos", cos_node)
    inv_freq, positions, _ = freqs(cat.inputs[0])
    inv_freq = np.asarray(inv_freq, dtype=np.float64).reshape(-1)
    check(inv_freq.size >= 1 and np.all(inv_freq > 0), "rope table: inv_freq is not positive", cat)
    table = RopeTable(inv_freq=inv_freq, positions=positions, cos=cos_node.outputs[0], sin=sins[0].outputs[0])
    return cos_node.outputs[0], table
