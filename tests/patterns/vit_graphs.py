"""Hand-built vision-block attention for the vit_rope / vit_attention unit tests.

q, k, v [T, H=2, D=8] before RoPE, angles [T, D/2], an additive [T, T] mask: the form the vision
export traces (vision/towers.py), piece by piece so a test can break one thing.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from onnx_rewriter.matching import engine
from onnx_rewriter.patterns import VISION_STAGES, load_patterns
from tests.patterns.graphs import Builder, i64

H, D = 2, 8


def run(graph) -> engine.Context:
    return engine.run(graph, list(VISION_STAGES), load_patterns(VISION_STAGES))


def rope(b: Builder, x, cos, sin, d: int = D) -> SimpleNamespace:
    """Add(Mul(x, Unsqueeze(cos, 1)), Mul(Concat(Neg(Slice(x, d/2:)), Slice(x, :d/2)), Unsqueeze(sin, 1)))."""
    c, s = b.op("Unsqueeze", cos, i64(1)), b.op("Unsqueeze", sin, i64(1))
    hi = b.op("Slice", x, i64(d // 2), i64(2**62), i64(-1), i64(1))
    lo = b.op("Slice", x, i64(0), i64(d // 2), i64(-1), i64(1))
    neg = b.op("Neg", hi)
    rot = b.op("Concat", neg, lo, axis=-1)
    cos_mul, sin_mul = b.op("Mul", x, c), b.op("Mul", rot, s)
    out = b.op("Add", cos_mul, sin_mul, shape=x.shape)
    return SimpleNamespace(x=x, hi=hi, lo=lo, neg=neg, rot=rot, cos_mul=cos_mul, sin_mul=sin_mul, out=out)


def block() -> SimpleNamespace:
    b = Builder()
    q, k, v = (b.input(n, ["T", H, D]) for n in "qkv")
    angles = b.input("angles", ["T", D // 2])
    mask = b.input("mask", ["T", "T"])
    cat = b.op("Concat", angles, angles, axis=-1)
    cos, sin = b.op("Cos", cat), b.op("Sin", cat)
    q_rope, k_rope = rope(b, q, cos, sin), rope(b, k, cos, sin)
    qh = b.op("Transpose", q_rope.out, perm=[1, 0, 2])
    kt = b.op("Transpose", k_rope.out, perm=[1, 2, 0])
    vh = b.op("Transpose", v, perm=[1, 0, 2])
    qk = b.op("MatMul", qh, kt)
    scaled = b.op("Mul", qk, np.float32(D ** -0.5))
    scores = b.op("Add", scaled, mask)
    prob = b.op("Softmax", scores, axis=-1)
    pv = b.op("MatMul", prob, vh)
    out = b.op("Transpose", pv, perm=[1, 0, 2], shape=["T", H, D])
    return SimpleNamespace(b=b, q=q, k=k, v=v, angles=angles, mask=mask, cat=cat, cos=cos, sin=sin, q_rope=q_rope,
                           k_rope=k_rope, qh=qh, kt=kt, vh=vh, qk=qk, scaled=scaled, scores=scores, prob=prob,
                           pv=pv, out=out, graph=lambda: b.graph(out))
