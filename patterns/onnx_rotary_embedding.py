"""RoPE as the ONNX `RotaryEmbedding` op (opset 23): RotaryEmbedding(x[B,H,S,D], cos, sin).

Dynamo recomputes cos/sin per node, `Cos(f)` / `Sin(f)` of one shared `f = positions · inv_freq`
[B, S, R/2] (no Concat(f, f): the op takes half-width tables). q and k of every layer then read
different Cos nodes, so the table is keyed by `f` itself: one RopeTable per distinct `f`, which
keeps the identity check in attention_layer (q and k roped by the same table) meaningful.
"""

import numpy as np

from onnx_rewriter.matching import CASTS, Refuse, RopeApply, RopeTable, check, expect, peel_scale, producer, skip

from ._rope_common import angles_matmul, angles_mul, positive_inv_freq


def _freqs(angles, at):
    """(inv_freq, positions) of f in the rope_table_mul or the rope_table_matmul form."""
    n = producer(angles)
    form = angles_matmul if n is not None and n.op == "Transpose" else angles_mul
    return form(angles, at, "rotary angles")


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
        cos_t, cs = peel_scale(cos_t, CASTS)
        sin_t, ss = peel_scale(sin_t, CASTS)
        check(abs(cs - ss) <= 1e-6 * max(1.0, abs(cs)), "RotaryEmbedding: cos and sin scaled differently", node)
        cos_n = expect(skip(cos_t, CASTS), "Cos", "RotaryEmbedding cos", node)
        sin_n = expect(skip(sin_t, CASTS), "Sin", "RotaryEmbedding sin", node)
        f = skip(cos_n.inputs[0], CASTS)
        check(skip(sin_n.inputs[0], CASTS) is f, "RotaryEmbedding: cos and sin of different angles", node)
        tables = ctx.info.setdefault("onnx_rope_tables", {})
        table = tables.get(f.name)
        if table is None:
            inv, positions = _freqs(f, cos_n)
            inv = positive_inv_freq(inv, cos_n, "rotary angles")
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
