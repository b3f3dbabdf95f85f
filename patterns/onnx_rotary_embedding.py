"""RoPE as the ONNX `RotaryEmbedding` op (opset 23): RotaryEmbedding(x[B,H,S,D], cos, sin).

Dynamo recomputes cos/sin per node, `Cos(f)` / `Sin(f)` of one shared `f = positions · inv_freq`
[B, S, R/2] (no Concat(f, f): the op takes half-width tables). q and k of every layer then read
different Cos nodes, so the table is keyed by `f` itself: one RopeTable per distinct `f`, which
keeps the identity check in attention_layer (q and k roped by the same table) meaningful.
"""

import numpy as np

from onnx_rewriter.engine import Refuse
from onnx_rewriter.layers import RopeApply, RopeTable
from onnx_rewriter.matching import check, const, expect, producer, skip

PASS = ("Cast",)


def _scaled(t):
    """(tensor, scale) through an optional Mul by a scalar constant (attention_scaling)."""
    n = producer(t)
    if n is not None and n.op == "Mul":
        for i in (0, 1):
            c = const(n.inputs[i])
            if c is not None and c.size == 1:
                return n.inputs[1 - i], float(c.reshape(()))
    return t, 1.0


def _freqs(angles, at):
    """(inv_freq, positions) of f = Mul(Cast(Unsqueeze(positions)), inv_freq) or Transpose(MatMul(inv, pos))."""
    n = producer(angles)
    if n is not None and n.op == "Transpose":
        mm = expect(n.inputs[0], "MatMul", "rotary angles", n)
        inv = const(skip(mm.inputs[0], ("Expand", "Cast", "Unsqueeze", "Reshape")))
        check(inv is not None, "rotary angles: MatMul has no constant inv_freq operand", mm)
        return inv, skip(mm.inputs[1], ("Cast", "Unsqueeze"))
    mul = expect(angles, "Mul", "rotary angles", at)
    a, b = mul.inputs
    inv = const(b) if const(b) is not None else const(a)
    check(inv is not None, "rotary angles: no constant inv_freq operand", mul)
    return inv, skip(a if const(b) is not None else b, ("Cast", "Unsqueeze"))


class OnnxRotaryEmbedding:
    name = "onnx_rotary_embedding"
    stage = "rope"
    anchors = ("RotaryEmbedding",)

    def match(self, node, ctx):
        if node.attrs.get("interleaved", 0):
            raise Refuse("interleaved RoPE (RotaryEmbedding interleaved=1) is not supported by the AttentionPlugin "
                         "kernel, which only rotates halves", node)
        check(len(node.inputs) == 3 or not node.inputs[3].name,
              "RotaryEmbedding with position_ids (gathered cos/sin caches) is not recognized", node)
        x, cos_t, sin_t = node.inputs[:3]
        check(x.shape is not None and len(x.shape) == 4, "RotaryEmbedding input is not [B, H, S, D]", node)
        cos_t, cs = _scaled(skip(cos_t, PASS))
        sin_t, ss = _scaled(skip(sin_t, PASS))
        check(abs(cs - ss) <= 1e-6 * max(1.0, abs(cs)), "RotaryEmbedding: cos and sin scaled differently", node)
        cos_n = expect(skip(cos_t, PASS), "Cos", "RotaryEmbedding cos", node)
        sin_n = expect(skip(sin_t, PASS), "Sin", "RotaryEmbedding sin", node)
        f = skip(cos_n.inputs[0], PASS)
        check(skip(sin_n.inputs[0], PASS) is f, "RotaryEmbedding: cos and sin of different angles", node)
        tables = ctx.info.setdefault("onnx_rope_tables", {})
        table = tables.get(f.name)
        if table is None:
            inv, positions = _freqs(f, cos_n)
            inv = np.asarray(inv, dtype=np.float64).reshape(-1)
            check(inv.size >= 1 and np.all(inv > 0), "rotary angles: inv_freq is not positive", cos_n)
            table = tables[f.name] = RopeTable(inv_freq=inv, positions=positions, cos=cos_n.outputs[0],
                                               sin=sin_n.outputs[0], attention_scaling=cs)
        check(abs(table.attention_scaling - cs) <= 1e-6 * max(1.0, abs(cs)),
              "RotaryEmbedding: layers scale one cos/sin table differently", node)
        r = 2 * table.inv_freq.size
        attr_r = node.attrs.get("rotary_embedding_dim", 0)
        check(attr_r in (0, r), f"RotaryEmbedding rotary_embedding_dim={attr_r} but the table has {r} dims", node)
        d = x.shape[-1]
        check(not isinstance(d, (int, np.integer)) or d == r or (attr_r == r and d > r),
              f"RotaryEmbedding: head size {d} but the table has {r} dims", node)
        return node.outputs[0], RopeApply(x=x, table=table, rotary_dim=r, patterns=[self.name])


PATTERN = OnnxRotaryEmbedding()
