"""moe_block: a routed MoE block as transformers' batched_mm experts export it (see patterns/moe_block.py).

Hand-built like the tiny Qwen3-MoE export (tests/test_moe.py matches the real one): E 8, top-2, H 16, I 4."""

from __future__ import annotations

import numpy as np
import pytest

from tests.patterns.graphs import Builder, i64, node, reasons, result, run

E, K, H, I = 8, 2, 16, 4


def moe(renorm=True, silu_on_up=False, router_bias=False, expert_bias=False, weight_by_values=False):
    b = Builder()
    x = b.input("x", ["T", H])
    rng = np.random.default_rng(0)
    router = b.const(rng.standard_normal((E, H)).astype(np.float32))
    gemm_in = [x, router] + ([b.const(np.zeros(E, np.float32))] if router_bias else [])
    logits = b.op("Gemm", *gemm_in, shape=["T", E], transB=1)
    p = b.op("Softmax", logits, shape=["T", E], axis=-1)
    values, idx = b.op("TopK", p, i64(K), n_out=2, axis=-1, largest=1, sorted=1)
    values.shape = idx.shape = ["T", K]
    weights = values
    if renorm:
        s = b.op("ReduceSum", values, i64(-1), shape=["T", 1], keepdims=1)
        weights = b.op("Div", values, s, shape=["T", K])
    # x repeated k times, the indices flattened
    rep = b.op("Reshape", b.op("Expand", b.op("Unsqueeze", x, i64(1)), i64(1, K, 1)), i64(-1, H), shape=["TK", H])
    flat = b.op("Unsqueeze", b.op("Reshape", idx, i64(-1), shape=["TK"]), i64(1), shape=["TK", 1])
    gu = b.op("GatherND", b.const(rng.standard_normal((E, 2 * I, H)).astype(np.float32)), flat,
              shape=["TK", 2 * I, H], batch_dims=0)
    a = b.op("Squeeze", b.op("MatMul", gu, b.op("Unsqueeze", rep, i64(2)), shape=["TK", 2 * I, 1]), i64(2),
             shape=["TK", 2 * I])
    if expert_bias:
        a = b.op("Add", a, np.zeros(2 * I, np.float32), shape=["TK", 2 * I])
    gate, up = b.op("Split", a, n_out=2, axis=1, num_outputs=2)
    gate.shape = up.shape = ["TK", I]
    g_in = up if silu_on_up else gate
    silu = b.op("Mul", g_in, b.op("Sigmoid", g_in, shape=["TK", I]), shape=["TK", I])
    m = b.op("Mul", silu, gate if silu_on_up else up, shape=["TK", I])
    dn = b.op("GatherND", b.const(rng.standard_normal((E, H, I)).astype(np.float32)), flat, shape=["TK", H, I],
              batch_dims=0)
    d = b.op("Squeeze", b.op("MatMul", dn, b.op("Unsqueeze", m, i64(2)), shape=["TK", H, 1]), i64(2), shape=["TK", H])
    w = b.op("Unsqueeze", b.op("Reshape", values if weight_by_values else weights, i64(-1)), i64(1), shape=["TK", 1])
    y = b.op("Mul", d, w, shape=["TK", H])
    out = b.op("ReduceSum", b.op("Reshape", y, i64(-1, K, H), shape=["T", K, H]), i64(1), shape=["T", H], keepdims=0)
    return b.graph(out), idx.inputs[0], out


@pytest.mark.parametrize("renorm", [True, False])
def test_matches_and_reads_the_block(renorm):
    g, topk, out = moe(renorm=renorm)
    m = result(run(g), "moe", topk)
    assert (m.experts, m.top_k, m.hidden, m.inter, m.renormalize) == (E, K, H, I, renorm)
    assert m.out is out and m.x.name == "x"
    assert tuple(m.gate_up.shape) == (E, 2 * I, H) and tuple(m.down.shape) == (E, H, I)


@pytest.mark.parametrize("change,reason", [
    (dict(silu_on_up=True), "SiLU of the gate half (the first half)"),  # SiLU on the second half: up, gate
    (dict(router_bias=True), "router Gemm has a bias"),
    (dict(expert_bias=True), "gate/up split: expected one Split"),  # GPT-OSS-style expert biases
    (dict(weight_by_values=True), "not weighted by the renormalized top-k weights"),
])
def test_rejections(change, reason):
    g, topk, _ = moe(**change)
    why = reasons(run(g), "moe", topk)
    assert len(why) == 1 and reason in why[0], why


def test_softmax_not_read_by_a_router_is_not_a_block():
    g, topk, _ = moe()
    node(topk.inputs[0]).op = "Relu"
    assert "router probabilities: expected Softmax" in reasons(run(g), "moe", topk)[0]
