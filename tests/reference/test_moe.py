"""MoE plugins' CPU reference (Fp16MoePlugin, Int4MoePlugin) and the Marlin expert bytes (contract part 3 §15).

The bytes are pinned to NVIDIA's own SHA-256 test vectors (its `pack_int4_awq_marlin`); the plugins run as
one-node graphs through the reference evaluator (as `verify` runs them) and are compared with transformers'
own MoE blocks on random weights: Qwen3MoeSparseMoeBlock (norm_topk_prob true and false) and
Qwen2MoeSparseMoeBlock (shared expert with its sigmoid gate, norm_topk_prob false, the top-k probability
mass applied after the always-renormalizing Int4MoePlugin). A swapped gate/up order or a dropped
renormalization moves the output by O(1); fp16 rounding by ~1e-3.
"""

import hashlib

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from onnx_rewriter.features.moe import layout as L
from onnx_rewriter.reference import moe as R
from onnx_rewriter.reference.ops import reference_evaluator

# ------------------------------------------------------------------ Marlin bytes: NVIDIA's test vectors


def _vectors(e_count, n, k, g):
    e, nn, kk = np.ix_(np.arange(e_count), np.arange(n), np.arange(k))
    u = ((3 * nn + 5 * kk + 7 * e + (nn * kk) // 7) % 16).astype(np.uint8)  # U[e, n, k]
    e, nn, gg = np.ix_(np.arange(e_count), np.arange(n), np.arange(k // g))
    s = ((1 + (3 * nn + 5 * gg + e) % 17) / 64).astype(np.float16)  # S[e, n, g]
    return u, s


def _sha(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.mark.parametrize("n,k,q_sha,s_sha", [
    (128, 256, "1e726ddf71f1aecfdfce51e31b3d6d53fdfd744fe03e9e810dee275964ec8727",
     "6b822197077690948b067be706961f4e6e7695824bcc21782655da3bed8d7aed"),
    (256, 128, "6c5757ac98dfc1706c5d8e36e54a357ee47db77459799b0a14a3241e30e79322",  # one group: per-channel
     "5c7c84bb485d19b47474f075550f5ea80447082d066c1b5be4ae4b604bcba4f9")], ids=["groups", "per_channel"])
def test_marlin_bytes_match_nvidia(n, k, q_sha, s_sha):
    u, s = _vectors(2, n, k, 128)
    q, sc = L.pack_int4_experts(list(u), [x.T for x in s])
    assert q.dtype == np.int8 and q.shape == (2, k // 16, 8 * n)
    assert sc.dtype == np.float16 and sc.shape == (2, k // 128, n)
    assert _sha(q) == q_sha and _sha(sc) == s_sha
    if k == 256:
        assert [hex(w) for w in q[0, 0].view("<u4")[:4]] == ["0xfed59880", "0x3017b8a0", "0x8269d8c0", "0xd5ab08e0"]
    # the reference reads back exactly what was packed
    for e in range(2):
        assert np.array_equal(R.unpack_marlin(q[e], n, k), u[e])
        assert np.array_equal(R.unpack_marlin_scales(sc[e], k // 128, n), s[e].T)


@pytest.mark.parametrize("n,k,groups", [(64, 16, 1), (128, 64, 1), (192, 128, 2), (64, 512, 8)])
def test_marlin_round_trip(n, k, groups):
    rng = np.random.default_rng(n * k)
    u = rng.integers(0, 16, (n, k)).astype(np.uint8)
    assert np.array_equal(R.unpack_marlin(L.pack_marlin(u), n, k), u)
    s = rng.random((groups, n)).astype(np.float16)
    packed = L.pack_marlin_scales(s)
    assert not np.array_equal(packed, s)  # the permutation moves scales
    assert np.array_equal(R.unpack_marlin_scales(packed, groups, n), s)


def test_marlin_rejects_bad_shapes():
    with pytest.raises(ValueError, match="N % 64"):
        L.pack_marlin(np.zeros((32, 16), np.uint8))
    with pytest.raises(ValueError, match="nibbles"):
        L.pack_marlin(np.full((64, 16), 16))
    with pytest.raises(ValueError, match="expected"):
        R.unpack_marlin(np.zeros((1, 64), np.int8), 64, 32)


def test_fc1_row_orders():
    gate = np.arange(128 * 2, dtype=np.float16).reshape(1, 128, 2)
    up = -gate
    f = L.fp16_fc1(gate, up)
    assert np.array_equal(f[0, :64], up[0, :64]) and np.array_equal(f[0, 64:128], gate[0, :64])
    assert np.array_equal(f[0, 128:192], up[0, 64:]) and np.array_equal(f[0, 192:], gate[0, 64:])
    assert all(np.array_equal(a, b) for a, b in zip(R.fp16_fc1_split(f, 128), (gate, up)))
    i4 = L.int4_fc1(gate, up)
    assert np.array_equal(i4[0, :128], gate[0]) and np.array_equal(i4[0, 128:], up[0])
    assert all(np.array_equal(a, b) for a, b in zip(R.int4_fc1_split(i4, 128), (gate, up)))


# ------------------------------------------------------------------ plugins vs transformers' MoE blocks


def _block(cls_name, e, k, h, i, norm, seed, shared=0):
    import transformers

    kw = dict(hidden_size=h, moe_intermediate_size=i, num_experts=e, num_experts_per_tok=k, norm_topk_prob=norm,
              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    if shared:
        kw["shared_expert_intermediate_size"] = shared
    mod = transformers.models.qwen3_moe.modeling_qwen3_moe if cls_name == "Qwen3Moe" \
        else transformers.models.qwen2_moe.modeling_qwen2_moe
    config = getattr(transformers, f"{cls_name}Config")(**kw)
    config._experts_implementation = "eager"
    block = getattr(mod, f"{cls_name}SparseMoeBlock")(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():  # fp16-representable weights: both sides read the same numbers
            p.copy_((torch.randn(p.shape, generator=gen) * (0.1 if p.dim() == 2 and p.shape[0] == e else 0.08))
                    .half().float())
    return block


def _x(rows, h, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    return (torch.randn(2, rows // 2, h, generator=gen)).half().float()


def _hf(block, x):
    """transformers' output and its router logits (fp32, computed from the same fp16-valued input)."""
    with torch.no_grad():
        y = block(x)
        logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), block.gate.weight)
    return y.numpy(), logits.numpy()


def _run_node(op, inputs, attrs):
    names = [f"in{j}" for j in range(len(inputs))]
    dt = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
          np.dtype(np.int8): TensorProto.INT8}
    node = helper.make_node(op, names, ["y"], domain="trt_edgellm", **attrs)
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info(nm, dt[a.dtype], a.shape)
                                              for nm, a in zip(names, inputs)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("trt_edgellm", 1)])
    return reference_evaluator(model).run(None, dict(zip(names, inputs)))[0]


def _close(ours, want, tol=4e-3):
    err = np.abs(ours.astype(np.float32) - want).max() / np.abs(want).max()
    assert err < tol, f"relative max error {err:.2e}"
    return err


def _fp16_inputs(block, x, logits, e, i, h, **attrs):
    gu = block.experts.gate_up_proj.detach().numpy()  # [E, 2I, H]: gate rows, then up (chunk(2))
    fc1 = L.fp16_fc1(gu[:, :i], gu[:, i:]).astype(np.float16)
    fc2 = block.experts.down_proj.detach().numpy().astype(np.float16)
    k = block.gate.top_k
    return ([logits, x.numpy().astype(np.float16), fc1, fc2],
            dict(num_experts=e, top_k=k, hidden_size=h, moe_inter_size=i, activation_type=2, max_routed_rows=0,
                 **attrs))


@pytest.mark.parametrize("norm", [True, False])
def test_fp16_moe_plugin_matches_qwen3_moe_block(norm):
    e, k, h, i = 128, 4, 128, 128
    block = _block("Qwen3Moe", e, k, h, i, norm, seed=1)
    x = _x(16, h, 1)
    want, logits = _hf(block, x)
    inputs, attrs = _fp16_inputs(block, x, logits, e, i, h, norm_topk_prob=int(norm))
    y = _run_node("Fp16MoePlugin", inputs, attrs)
    assert y.dtype == np.float16 and y.shape == x.shape
    _close(y, want)
    # the bugs this must catch: gate/up rows in Int4MoePlugin's order, renormalization flipped
    wrong = [inputs[0], inputs[1], L.int4_fc1(*R.fp16_fc1_split(inputs[2], i)), inputs[3]]
    assert np.abs(_run_node("Fp16MoePlugin", wrong, attrs).astype(np.float32) - want).max() > 0.2 * np.abs(want).max()
    flipped = _run_node("Fp16MoePlugin", inputs, {**attrs, "norm_topk_prob": int(not norm)})
    assert np.abs(flipped.astype(np.float32) - want).max() > 0.1 * np.abs(want).max()


def test_fp16_moe_plugin_refuses_what_the_runtime_refuses():
    x = np.zeros((4, 128), np.float16)
    with pytest.raises(ValueError, match="128, 256"):
        R.fp16_moe_plugin(np.zeros((4, 8), np.float32), x, np.zeros((8, 128, 128), np.float16),
                          np.zeros((8, 128, 64), np.float16), num_experts=8, top_k=2, hidden_size=128,
                          moe_inter_size=64)


def _int4_experts(e, h, i, g, seed):
    """Random per-expert codes -> (fp16 gate_up [E, 2I, H] and down [E, H, I] they dequantize to, plugin inputs)."""
    rng = np.random.default_rng(seed)
    u_gu = rng.integers(0, 16, (e, 2 * i, h)).astype(np.uint8)  # HF order: gate rows then up = Int4's order
    u_dn = rng.integers(0, 16, (e, h, i)).astype(np.uint8)
    s_gu = (rng.random((e, h // g, 2 * i)) * 0.02 + 0.005).astype(np.float16)
    s_dn = (rng.random((e, i // g, h)) * 0.02 + 0.005).astype(np.float16)

    def deq(u, s):  # [E, N, K], [E, K/G, N]
        per_k = np.repeat(s.astype(np.float32), u.shape[2] // s.shape[1], axis=1).transpose(0, 2, 1)
        return ((u.astype(np.float32) - 8) * per_k).astype(np.float16)

    q_gu, p_gu = L.pack_int4_experts(list(L.int4_fc1(u_gu[:, :i], u_gu[:, i:])), list(s_gu))
    q_dn, p_dn = L.pack_int4_experts(list(u_dn), list(s_dn))
    return deq(u_gu, s_gu), deq(u_dn, s_dn), [q_gu, p_gu, q_dn, p_dn]


def _int4_block(cls_name, e, k, h, i, g, norm, seed, shared=0):
    """transformers' MoE block holding random INT4 experts exactly (their dequantized fp16 values), and the
    plugin inputs of those experts."""
    block = _block(cls_name, e, k, h, i, norm, seed=seed, shared=shared)
    gu, dn, packed = _int4_experts(e, h, i, g, seed=seed)
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(torch.from_numpy(gu.astype(np.float32)))
        block.experts.down_proj.copy_(torch.from_numpy(dn.astype(np.float32)))
    return block, packed


def test_int4_moe_plugin_matches_qwen3_moe_block():
    e, k, h, i, g = 8, 2, 256, 64, 64  # FC1: 4 scale groups (64-chunk permutation), FC2: 1 group (per-channel)
    block, packed = _int4_block("Qwen3Moe", e, k, h, i, g, True, seed=2)
    x = _x(12, h, 2)
    want, logits = _hf(block, x)
    attrs = dict(num_experts=e, top_k=k, hidden_size=h, moe_inter_size=i, activation_type=0,
                 quantization_group_size=g)
    inputs = [logits, x.numpy().astype(np.float16), *packed]
    _close(_run_node("Int4MoePlugin", inputs, attrs), want)
    # 0.11 feeds rank-2 hidden states [T, H]: same numbers
    flat = _run_node("Int4MoePlugin", [logits, inputs[1].reshape(-1, h), *packed], attrs)
    assert flat.shape == (12, h)
    _close(flat.reshape(x.shape), want)
    # gate/up in Fp16MoePlugin's interleave instead: wrong
    u_gu = np.stack([R.unpack_marlin(q, 2 * i, h) for q in packed[0]])
    swapped = np.stack([L.pack_marlin(u) for u in L.fp16_fc1(u_gu[:, :i], u_gu[:, i:])])
    bad = _run_node("Int4MoePlugin", [logits, inputs[1], swapped, *packed[1:]], attrs)
    assert np.abs(bad.astype(np.float32) - want).max() > 0.2 * np.abs(want).max()


def test_int4_moe_plugin_with_topk_mass_matches_qwen2_moe_block():
    """Qwen2-MoE: norm_topk_prob false and a shared expert. Int4MoePlugin always renormalizes; the graph multiplies
    its output by r = sum of the top-k probabilities (fp16), then adds sigmoid(x W_seg) * shared(x) (§15.5, §15.6)."""
    e, k, h, i, g, shared = 8, 4, 128, 64, 64, 64
    block, packed = _int4_block("Qwen2Moe", e, k, h, i, g, False, seed=3, shared=shared)
    x = _x(10, h, 3)
    want, logits = _hf(block, x)
    attrs = dict(num_experts=e, top_k=k, hidden_size=h, moe_inter_size=i, activation_type=0,
                 quantization_group_size=g)
    x16 = x.numpy().astype(np.float16)
    routed = _run_node("Int4MoePlugin", [logits, x16, *packed], attrs)
    r = R.topk_mass(logits, k).astype(np.float16).reshape(2, 5, 1)
    assert 0.2 < r.min() and r.max() < 0.9  # not 1: dropping the factor is a visible bug
    routed = (routed.astype(np.float32) * r.astype(np.float32)).astype(np.float16)

    se = block.shared_expert
    w = {n: p.detach().numpy() for n, p in se.named_parameters()}
    xf = x.numpy()
    a = xf @ w["gate_proj.weight"].T
    s = ((a / (1 + np.exp(-a))) * (xf @ w["up_proj.weight"].T)) @ w["down_proj.weight"].T
    gate = 1 / (1 + np.exp(-(xf @ block.shared_expert_gate.weight.detach().numpy().T)))
    ours = routed.astype(np.float32) + gate * s
    _close(ours, want)
    # without the top-k mass (the plugin's renormalized output as it is): wrong
    unscaled = _run_node("Int4MoePlugin", [logits, x16, *packed], attrs).astype(np.float32) + gate * s
    assert np.abs(unscaled - want).max() > 0.1 * np.abs(want).max()


def test_route_renormalizes_exactly_and_breaks_ties_low():
    logits = np.array([[0.0, 2.0, 2.0, 1.0], [5.0, 1.0, 1.0, 1.0]], np.float32)
    idx, w = R.route(logits, 2, renormalize=True)
    assert idx.tolist() == [[1, 2], [0, 1]]
    assert np.allclose(w.sum(-1), 1, atol=1e-7)
    idx0, w0 = R.route(logits, 2, renormalize=False)
    assert np.array_equal(idx0, idx) and np.allclose(w0 / w0.sum(-1, keepdims=True), w, atol=1e-7)
    assert np.allclose(R.topk_mass(logits, 2)[:, 0], w0.sum(-1))


# ------------------------------------------------------------------ GPTQ / AutoAWQ experts -> Marlin, exactly


def _gptq_tensors(q, z, s, g_idx=None):
    """GPTQ storage of codes q [K, N], actual zeros z [K/G, N] (stored as z - 1), scales [K/G, N]."""
    k, n = q.shape
    qw = np.zeros((k // 8, n), np.uint32)
    for j in range(8):
        qw |= q[j::8].astype(np.uint32) << np.uint32(4 * j)
    qz = np.zeros((z.shape[0], n // 8), np.uint32)
    for j in range(8):
        qz |= (z[:, j::8] - 1).astype(np.uint32) << np.uint32(4 * j)
    t = {"qweight": qw.view(np.int32), "qzeros": qz.view(np.int32), "scales": s}
    if g_idx is not None:
        t["g_idx"] = g_idx
    return t


def _awq_tensors(q, z, s):
    """AutoAWQ GEMM storage: qweight [K, N/8], nibble j of column c = output channel 8c + [0,2,4,6,1,3,5,7][j]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def pack(a):
        out = np.zeros((a.shape[0], a.shape[1] // 8), np.uint32)
        for j in range(8):
            out |= a[:, order[j]::8].astype(np.uint32) << np.uint32(4 * j)
        return out.view(np.int32)
    return {"qweight": pack(q), "qzeros": pack(z), "scales": s}


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_checkpoint_experts_become_marlin_bytes_exactly(method):
    from onnx_rewriter.features.int4.checkpoint import read

    rng = np.random.default_rng(7)
    k, n, g = 256, 128, 128
    z = rng.integers(6, 11, (k // g, n))  # asymmetric, but q - z + 8 fits a nibble where q is near z
    q = np.clip(z[np.arange(k) // g] + rng.integers(-6, 7, (k, n)), 0, 15)
    s = (rng.random((k // g, n)) * 0.01 + 0.001).astype(np.float16)
    tensors = _gptq_tensors(q, z, s) if method == "gptq" else _awq_tensors(q, z, s)
    linear = read({"quant_method": method, "group_size": g}, tensors)
    u, scales = L.expert_codes(linear, "model.layers.0.mlp.experts.3.gate_proj")
    qw, sc = L.pack_marlin(u), L.pack_marlin_scales(scales)
    w = R.dequantize_marlin(qw, sc, n, k)  # [N, K] as the plugin forms it
    assert np.array_equal(w, linear.dequantized().T)  # what the checkpoint means, bit for bit


def test_checkpoint_experts_that_cannot_be_exact_are_refused():
    from onnx_rewriter.features.int4.checkpoint import read

    k, n, g = 256, 128, 128
    z = np.full((k // g, n), 12)
    q = np.zeros((k, n), int)  # q - z + 8 = -4: would have to be clipped
    s = np.ones((k // g, n), np.float16)
    with pytest.raises(ValueError, match=r"layers.1.*outside \[0, 15\].*zero-point"):
        L.expert_codes(read({"quant_method": "gptq", "group_size": g}, _gptq_tensors(q, z, s)), "layers.1 expert 0")
    g_idx = (np.arange(k) // g)[::-1].copy()  # act-order
    q = np.full((k, n), 12)
    with pytest.raises(ValueError, match="act-order"):
        L.expert_codes(read({"quant_method": "gptq", "group_size": g}, _gptq_tensors(q, z, s, g_idx)), "layers.1")
