"""Small hand-built graphs for the pattern unit tests: one decoder layer's attention, piece by piece.

Every builder adds nodes to a `Builder` and returns the tensors and nodes a test may break, so a test
reads: build the canonical subgraph, change one thing, run the pattern library, compare the reason.
Shapes: q [B, 4, S, 8], k and v [B, 2, S, 8] (GQA with 2 groups), head size 8, full rotary.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx_graphsurgeon as gs

from onnx_rewriter.matching import engine
from onnx_rewriter.patterns import STAGES, load_patterns

HQ, HKV, D = 4, 2, 8
INV_FREQ = (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)


def i64(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


class Builder:
    """Nodes named `<Op>_<n>` in creation order; constants from numpy values."""

    def __init__(self):
        self.nodes, self.inputs, self.outputs, self.n = [], [], [], 0

    def input(self, name, shape, dtype=np.float32) -> gs.Variable:
        v = gs.Variable(name, dtype=dtype, shape=shape)
        self.inputs.append(v)
        return v

    def const(self, values) -> gs.Constant:
        self.n += 1
        return gs.Constant(f"const_{self.n}", np.asarray(values))

    def op(self, op, *inputs, shape=None, n_out=1, **attrs):
        """Add `op` and return its output (its outputs when n_out > 1); the node is `out.inputs[0]`."""
        self.n += 1
        name = f"{op}_{self.n}"
        ins = [x if isinstance(x, gs.Tensor) else self.const(x) for x in inputs]
        outs = [gs.Variable(f"{name}_out{k}", shape=shape) for k in range(n_out)]
        self.nodes.append(gs.Node(op, name=name, inputs=ins, outputs=outs, attrs=attrs))
        return outs[0] if n_out == 1 else outs

    def graph(self, *outputs) -> gs.Graph:
        return gs.Graph(nodes=self.nodes, inputs=self.inputs, outputs=list(self.outputs) + list(outputs), opset=23)


def node(t: gs.Tensor) -> gs.Node:
    return t.inputs[0]


# ---------------------------------------------------------------- running the library


def run(graph: gs.Graph) -> engine.Context:
    return engine.run(graph, list(STAGES), load_patterns(), info={"opset": 23})


def reasons(ctx: engine.Context, stage: str, anchor: gs.Node) -> list[str]:
    """`pattern: reason` of every pattern that tried `anchor` in `stage` and rejected it."""
    return [f"{m.pattern}: {m.reject.reason}" for m in ctx.anchor_misses(stage, anchor)]


def result(ctx: engine.Context, stage: str, anchor: gs.Node):
    m = ctx.anchor_match(stage, anchor)
    assert m is not None, reasons(ctx, stage, anchor)
    return m.result


# ---------------------------------------------------------------- pieces


def rope_table_mul(b: Builder, positions: gs.Tensor, inv=INV_FREQ) -> SimpleNamespace:
    """cos/sin = Cos/Sin(Concat(f, f)), f = Mul(Cast(Unsqueeze(positions, -1)), inv_freq)  (transformers 5)."""
    pos = b.op("Cast", b.op("Unsqueeze", positions, i64(-1)), to=1)
    f = b.op("Mul", pos, np.asarray(inv))
    cat = b.op("Concat", f, f, axis=-1)
    return SimpleNamespace(f=f, cat=cat, cos=b.op("Cos", cat), sin=b.op("Sin", cat))


def rope_table_matmul(b: Builder, positions: gs.Tensor, inv=INV_FREQ) -> SimpleNamespace:
    """f = Transpose(MatMul(inv_freq[None, :, None], positions[:, None, :]), (0, 2, 1))  (transformers 4)."""
    pos = b.op("Cast", b.op("Unsqueeze", positions, i64(1)), to=1)
    mm = b.op("MatMul", np.asarray(inv).reshape(1, -1, 1), pos)
    f = b.op("Transpose", mm, perm=[0, 2, 1])
    cat = b.op("Concat", f, f, axis=-1)
    return SimpleNamespace(f=f, mm=mm, cat=cat, cos=b.op("Cos", cat), sin=b.op("Sin", cat))


def half_slices(b: Builder, x: gs.Tensor, d: int = D) -> SimpleNamespace:
    """Slice(x, d/2:) and Slice(x, :d/2) on the last axis."""
    hi = b.op("Slice", x, i64(d // 2), i64(2**62), i64(-1), i64(1))
    lo = b.op("Slice", x, i64(0), i64(d // 2), i64(-1), i64(1))
    return SimpleNamespace(hi=hi, lo=lo)


def rotate_half(b: Builder, x: gs.Tensor, table: SimpleNamespace, d: int = D) -> SimpleNamespace:
    """Add(Mul(x, cos'), Mul(Concat(Neg(Slice(x, h:)), Slice(x, :h)), sin')), cos' = Unsqueeze(cos, 1)."""
    cos = b.op("Unsqueeze", table.cos, i64(1))
    sin = b.op("Unsqueeze", table.sin, i64(1))
    s = half_slices(b, x, d)
    neg = b.op("Neg", s.hi)
    rot = b.op("Concat", neg, s.lo, axis=-1)
    cos_mul = b.op("Mul", x, cos)
    sin_mul = b.op("Mul", rot, sin)
    out = b.op("Add", cos_mul, sin_mul, shape=x.shape)
    return SimpleNamespace(x=x, cos=cos, sin=sin, hi=s.hi, lo=s.lo, neg=neg, rot=rot, cos_mul=cos_mul,
                           sin_mul=sin_mul, out=out)


def repeat_kv(b: Builder, x: gs.Tensor, groups: int = HQ // HKV) -> gs.Tensor:
    """Reshape(Expand(Unsqueeze(x, 2), [B, Hkv, G, T, D]), [B, Hkv·G, T, D])."""
    unsq = b.op("Unsqueeze", x, i64(2))
    exp = b.op("Expand", unsq, i64(1, HKV, groups, 1, D))
    return b.op("Reshape", exp, i64(0, HKV * groups, -1, D), shape=["B", HKV * groups, "S", D])


def attention_core(b: Builder, q, k, v, mask, scale=D ** -0.5) -> SimpleNamespace:
    """MatMul(Softmax(MatMul(q, Transpose(k)) * scale + mask), v)."""
    kt = b.op("Transpose", k, perm=[0, 1, 3, 2])
    qk = b.op("MatMul", q, kt)
    scaled = b.op("Mul", qk, np.float32(scale))
    scores = b.op("Add", scaled, mask) if mask is not None else scaled
    prob = b.op("Softmax", scores, axis=-1)
    out = b.op("MatMul", prob, v, shape=["B", HQ, "S", D])
    return SimpleNamespace(kt=kt, qk=qk, scaled=scaled, scores=scores, softmax=node(prob), prob=prob, out=out)


def per_token(b: Builder, out: gs.Tensor, hq: int = HQ) -> gs.Tensor:
    """[B, H, S, D] back to per-token rows [B, S, H·D]."""
    t = b.op("Transpose", out, perm=[0, 2, 1, 3])
    return b.op("Reshape", t, i64(0, 0, hq * D), shape=["B", "S", hq * D])


def layer(q_shape=("B", HQ, "S", D), k_shape=("B", HKV, "S", D), v_shape=("B", HKV, "S", D)) -> SimpleNamespace:
    """One llama layer's attention from q, k, v inputs (before RoPE) to the per-token output."""
    b = Builder()
    q = b.input("q", list(q_shape))
    k = b.input("k", list(k_shape))
    v = b.input("v", list(v_shape))
    positions = b.input("position_ids", ["B", "S"], np.int64)
    mask = b.input("mask", ["B", 1, "S", "S"])
    table = rope_table_mul(b, positions)
    q_rope = rotate_half(b, q, table)
    k_rope = rotate_half(b, k, table)
    k_rep = repeat_kv(b, k_rope.out)
    v_rep = repeat_kv(b, v)
    core = attention_core(b, q_rope.out, k_rep, v_rep, mask)
    y = per_token(b, core.out)
    return SimpleNamespace(b=b, q=q, k=k, v=v, positions=positions, mask=mask, table=table, q_rope=q_rope,
                           k_rope=k_rope, k_rep=k_rep, v_rep=v_rep, core=core, y=y, graph=lambda: b.graph(y))
