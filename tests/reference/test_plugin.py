"""The numpy AttentionPlugin reference against a plain torch implementation (HF conventions)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from onnx_rewriter.analysis.rope import first_difference, model_rope_table, runtime_rope_table, table_difference
from onnx_rewriter.reference.ops import REFERENCE_OPS, reference_evaluator
from onnx_rewriter.reference.plugin import (
    PAGE_SIZE,
    apply_rope,
    dense_attention,
    packed_qkv_dense_attention,
    paged_attention,
    paged_batch_attention,
)

ROOT = Path(__file__).resolve().parents[2]
TOL = dict(rtol=1e-5, atol=1e-5)
NO_START = np.zeros((0,), np.int32)

CASES = [
    dict(hq=4, hkv=4, d=16, r=16),               # MHA
    dict(hq=4, hkv=2, d=16, r=16),               # GQA 2
    dict(hq=7, hkv=1, d=8, r=8),                 # GQA 7
    dict(hq=4, hkv=2, d=16, r=8),                # partial rotary
    dict(hq=4, hkv=2, d=16, r=16, window=3),     # sliding window, sequences longer than it
    dict(hq=4, hkv=2, d=16, r=16, scale=0.37),   # explicit attention_scale
    dict(hq=6, hkv=2, d=16, r=12, window=4, scale=0.2),
]
CASE_IDS = ["mha", "gqa2", "gqa7", "partial", "window", "scale", "mixed"]


# ---- torch reference (HF style) -------------------------------------------------------------

def rope_table(r, positions=256, theta=10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    freqs = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq[None]
    return torch.cat([freqs.cos(), freqs.sin()], -1).float().numpy()


def torch_rope(x, rows):
    """HF apply_rotary_pos_emb with cos/sin duplicated over the rotary half, pass-through tail."""
    r = rows.shape[-1]
    half = r // 2
    cos = torch.cat([rows[:, :half]] * 2, -1)[:, None]
    sin = torch.cat([rows[:, half:]] * 2, -1)[:, None]
    xr, tail = x[..., :r], x[..., r:]
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], -1)
    return torch.cat([xr * cos + rotated * sin, tail], -1)


def torch_rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def torch_attention(q, k, v, table, *, window=-1, scale=None, q_norm=None, k_norm=None, eps=1e-6):
    """Full-sequence causal attention; q [L,Hq,D], k/v [L,Hkv,D] at positions 0..L-1.

    Returns (out [L,Hq,D], roped k [L,Hkv,D]) as numpy."""
    q, k, v = (torch.from_numpy(np.asarray(x, np.float32)) for x in (q, k, v))
    if q_norm is not None:
        q, k = torch_rms(q, torch.from_numpy(q_norm), eps), torch_rms(k, torch.from_numpy(k_norm), eps)
    length = q.shape[0]
    rows = torch.from_numpy(table[:length])
    qr, kr = torch_rope(q, rows), torch_rope(k, rows)
    group = q.shape[1] // k.shape[1]
    kx, vx = kr.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    i = torch.arange(length)
    mask = i[None, :] <= i[:, None]
    if window > 0:
        mask &= i[None, :] > i[:, None] - window
    out = F.scaled_dot_product_attention(qr.transpose(0, 1), kx.transpose(0, 1), vx.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1).numpy(), kr.numpy()


# ---- data helpers ---------------------------------------------------------------------------

class Seqs:
    """Raw (pre-RoPE) q/k/v for a batch of full sequences, and their torch reference."""

    def __init__(self, case, lengths, seed=0):
        self.c = {"window": -1, "scale": None, **case}
        rng = np.random.default_rng(seed)
        hq, hkv, d = self.c["hq"], self.c["hkv"], self.c["d"]
        self.q = [rng.standard_normal((n, hq, d), np.float32) for n in lengths]
        self.k = [rng.standard_normal((n, hkv, d), np.float32) for n in lengths]
        self.v = [rng.standard_normal((n, hkv, d), np.float32) for n in lengths]
        self.table = rope_table(self.c["r"])
        self.ref = [torch_attention(q, k, v, self.table, window=self.c["window"], scale=self.c["scale"])
                    for q, k, v in zip(self.q, self.k, self.v)]

    def kwargs(self):
        c = self.c
        return dict(num_q_heads=c["hq"], num_kv_heads=c["hkv"], head_size=c["d"],
                    sliding_window_size=c["window"], attention_scale=c["scale"])

    def batch(self, spans, seq_len, seed=1):
        """Right-padded [B,S,H·D] q/k/v holding tokens spans[b] = (first, count) of each sequence."""
        rng = np.random.default_rng(seed)  # padding is noise: it must not leak into results
        out = []
        for parts in (self.q, self.k, self.v):
            h = parts[0].shape[1] * parts[0].shape[2]
            x = rng.standard_normal((len(spans), seq_len, h), np.float32)
            for b, (first, count) in enumerate(spans):
                x[b, :count] = parts[b][first:first + count].reshape(count, h)
            out.append(x)
        return out

    def empty_cache(self, cap, seed=2):
        c = self.c
        return np.random.default_rng(seed).standard_normal((len(self.q), 2, c["hkv"], cap, c["d"]), np.float32)

    def check_cache(self, present, upto):
        for b, n in enumerate(upto):
            np.testing.assert_allclose(present[b, 0, :, :n].transpose(1, 0, 2), self.ref[b][1][:n], **TOL)
            np.testing.assert_array_equal(present[b, 1, :, :n].transpose(1, 0, 2), self.v[b][:n])


def i32(x):
    return np.asarray(x, np.int32)


# ---- dense (0.9) ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_prefill_ragged(case):
    lengths = [7, 3, 5]
    s = Seqs(case, lengths)
    q, k, v = s.batch([(0, n) for n in lengths], 7)
    past = s.empty_cache(12)
    out, present = dense_attention(q, k, v, past, i32(lengths), s.table[None], NO_START, **s.kwargs())
    assert out.shape == (3, 7, case["hq"], case["d"]) and out.dtype == np.float32
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(out[b, :n], s.ref[b][0], **TOL)
        assert not out[b, n:].any()
        np.testing.assert_array_equal(present[b, :, :, n:], past[b, :, :, n:])
    s.check_cache(present, lengths)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_chunked_prefill(case):
    prefix, chunk = [4, 2, 6], [3, 5, 1]
    s = Seqs(case, [p + c for p, c in zip(prefix, chunk)])
    q, k, v = s.batch([(0, p) for p in prefix], 6)
    _, cache = dense_attention(q, k, v, s.empty_cache(16), i32(prefix), s.table[None], NO_START, **s.kwargs())
    q, k, v = s.batch(list(zip(prefix, chunk)), 5)
    out, present = dense_attention(q, k, v, cache, i32(chunk), s.table[None], i32(prefix), **s.kwargs())
    for b, (p, c) in enumerate(zip(prefix, chunk)):
        np.testing.assert_allclose(out[b, :c], s.ref[b][0][p:p + c], **TOL)
        assert not out[b, c:].any()
    s.check_cache(present, [p + c for p, c in zip(prefix, chunk)])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_decode_after_prefill(case):
    prompt, steps = [3, 5, 1], 6
    s = Seqs(case, [n + steps for n in prompt])
    q, k, v = s.batch([(0, n) for n in prompt], 5)
    _, cache = dense_attention(q, k, v, s.empty_cache(16), i32(prompt), s.table[None], NO_START, **s.kwargs())
    lengths = np.array(prompt)
    for _ in range(steps):
        q, k, v = s.batch([(n, 1) for n in lengths], 1)
        # decode: context_lengths = total length including the new token; start = cached length
        out, cache = dense_attention(q, k, v, cache, i32(lengths + 1), s.table[None], i32(lengths), **s.kwargs())
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(out[b, 0], s.ref[b][0][n], **TOL)
        lengths = lengths + 1
    s.check_cache(cache, lengths)


def test_per_row_rope_table_and_fp16_dtypes():
    s = Seqs(CASES[1], [4, 4])
    q, k, v = s.batch([(0, 4), (0, 4)], 4)
    table = np.stack([s.table, s.table])  # [B, P, R] form
    past = s.empty_cache(8).astype(np.float16)
    out, present = dense_attention(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16), past,
                                   i32([4, 4]), table, NO_START, **s.kwargs())
    assert out.dtype == np.float16 and present.dtype == np.float16 and present.shape == past.shape
    np.testing.assert_allclose(out[0, :4].astype(np.float32), s.ref[0][0], atol=2e-2)


def test_packed_qkv_matches_dense():
    s = Seqs(CASES[6], [6, 4])
    q, k, v = s.batch([(0, 6), (0, 4)], 6)
    past = s.empty_cache(8)
    args = (past, i32([6, 4]), s.table[None], NO_START)
    out, present = packed_qkv_dense_attention(np.concatenate([q, k, v], -1), *args, **s.kwargs())
    out_ref, present_ref = dense_attention(q, k, v, *args, **s.kwargs())
    np.testing.assert_array_equal(out, out_ref)
    np.testing.assert_array_equal(present, present_ref)
    np.testing.assert_allclose(out[1, :4], s.ref[1][0], **TOL)


def test_apply_rope_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=5e5)
    x = np.random.default_rng(0).standard_normal((1, 4, 9, 16), np.float32)  # HF [B, H, S, D]
    pos = torch.arange(9)[None]
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.from_numpy(x), pos)
    expected, _ = apply_rotary_pos_emb(torch.from_numpy(x), torch.from_numpy(x), cos, sin)
    ours = apply_rope(x[0].transpose(1, 0, 2), model_rope_table(cfg, 9))  # [S, H, D]
    np.testing.assert_allclose(ours, expected[0].numpy().transpose(1, 0, 2), **TOL)


def test_rope_tables():
    from transformers import LlamaConfig

    plain = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=5e5)
    runtime = runtime_rope_table({"head_dim": 16, "rope_theta": 5e5, "rope_scaling": None}, 2048)
    assert runtime.shape == (2048, 16) and runtime.dtype == np.float32
    # The runtime divides p by theta^(2d/R) where HF multiplies by inv_freq: equal up to fp32 rounding.
    assert table_difference(model_rope_table(plain, 2048), runtime) < 1e-3
    assert first_difference(runtime, model_rope_table(plain, 2048))[1] is None
    scaled = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 256})
    llama3 = runtime_rope_table({"head_dim": 16, "rope_theta": 5e5,
                                 "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, 2048)
    np.testing.assert_array_equal(llama3, runtime)  # the runtime ignores llama3 scaling
    assert table_difference(model_rope_table(scaled, 2048), llama3) > 1e-2
    assert first_difference(llama3, model_rope_table(scaled, 2048))[1] == 1  # already wrong at position 1
    dynamic = runtime_rope_table({"head_dim": 16, "rope_theta": 5e5, "rope_scaling": {"rope_type": "dynamic",
                                                                                        "factor": 4.0}}, 2048)
    np.testing.assert_array_equal(dynamic, runtime)  # dynamic is plain up to max_position_embeddings
    partial = runtime_rope_table({"hidden_size": 64, "num_attention_heads": 4, "partial_rotary_factor": 0.5}, 4)
    assert partial.shape == (4, 8)


# ---- paged (0.11) ---------------------------------------------------------------------------

def paged_layout(lengths, num_pages, order, hkv, d, seed=3):
    """Page table with pages handed out in `order` (not sorted); junk-filled fp32 pool."""
    max_pages = max(-(-(n + 1) // PAGE_SIZE) for n in lengths)  # room for one decode token
    table = -np.ones((len(lengths), 2, max_pages), np.int32)
    free = list(order)
    for n, length in enumerate(lengths):
        for j in range(-(-(length + 1) // PAGE_SIZE)):
            table[n, 0, j] = free.pop(0)
    table[:, 1] = np.where(table[:, 0] >= 0, table[:, 0] + num_pages, -1)
    pool = np.random.default_rng(seed).standard_normal((2, num_pages, PAGE_SIZE, hkv, d), np.float32)
    return table, pool


def pack_tokens(s, spans):
    """Token-major packed qkv [T, (Hq+2Hkv)·D] and per-token rope rows for spans (first, count)."""
    parts = [np.concatenate([x[first:first + count].reshape(count, -1) for x in (s.q[n], s.k[n], s.v[n])], -1)
             for n, (first, count) in enumerate(spans)]
    rows = np.concatenate([s.table[first:first + count] for first, count in spans])
    offsets = np.concatenate([[0], np.cumsum([c for _, c in spans])])
    return np.concatenate(parts), rows, i32(offsets)


def paged_call(s, pool, table, spans, **extra):
    qkv, rows, offsets = pack_tokens(s, spans)
    counts = i32([c for _, c in spans])
    past = i32([f for f, _ in spans])
    n_prefill = sum(1 for f, _ in spans if f == 0)
    return paged_attention(qkv, pool, counts, rows, past, table, offsets, past + counts,
                           np.zeros(1 if n_prefill else 3, np.int32), np.zeros(n_prefill, np.int32),
                           **s.kwargs(), **extra), offsets


def gather_pages(pool, table, n, length):
    flat = pool.reshape(-1, *pool.shape[2:])
    pos = np.arange(length)
    return flat[table[n, 0, pos // PAGE_SIZE], pos % PAGE_SIZE], flat[table[n, 1, pos // PAGE_SIZE], pos % PAGE_SIZE]


@pytest.mark.parametrize("case", [CASES[1], CASES[6]], ids=["gqa2", "mixed"])
def test_paged_matches_dense(case):
    c = dict(case, d=8, r=min(case["r"], 8))
    lengths = [130, 5, 70]
    s = Seqs(c, [n + 1 for n in lengths])
    table, pool = paged_layout(lengths, 6, order=[4, 1, 3, 0, 5, 2], hkv=c["hkv"], d=c["d"])
    # prefill all three, ragged, packed in T
    (out, pool), offsets = paged_call(s, pool, table, [(0, n) for n in lengths])
    q, k, v = s.batch([(0, n) for n in lengths], max(lengths))
    dense_out, cache = dense_attention(q, k, v, s.empty_cache(136), i32(lengths), s.table[None], NO_START,
                                       **s.kwargs())
    for n, length in enumerate(lengths):
        np.testing.assert_allclose(out[offsets[n]:offsets[n + 1]], dense_out[n, :length], **TOL)
    # one decode step: sequence 0 crosses into its second page
    (out, pool), _ = paged_call(s, pool, table, [(n, 1) for n in lengths])
    q, k, v = s.batch([(n, 1) for n in lengths], 1)
    dense_out, cache = dense_attention(q, k, v, cache, i32(lengths) + 1, s.table[None], i32(lengths), **s.kwargs())
    np.testing.assert_allclose(out, dense_out[:, 0], **TOL)
    for n, length in enumerate(lengths):
        np.testing.assert_allclose(out[n], s.ref[n][0][length], **TOL)
        keys, vals = gather_pages(pool, table, n, length + 1)
        np.testing.assert_array_equal(keys, cache[n, 0, :, :length + 1].transpose(1, 0, 2))
        np.testing.assert_array_equal(vals, cache[n, 1, :, :length + 1].transpose(1, 0, 2))


def test_paged_chunked_and_qk_norm():
    c = dict(hq=4, hkv=2, d=8, r=8)
    s = Seqs(c, [9, 6])
    rng = np.random.default_rng(5)
    qw, kw = rng.uniform(0.5, 1.5, 8).astype(np.float32), rng.uniform(0.5, 1.5, 8).astype(np.float32)
    refs = [torch_attention(q, k, v, s.table, q_norm=qw, k_norm=kw, eps=1e-5) for q, k, v in zip(s.q, s.k, s.v)]
    table, pool = paged_layout([9, 6], 3, order=[2, 0, 1], hkv=2, d=8)
    norm = dict(q_norm_weight=qw, k_norm_weight=kw, rms_norm_eps=1e-5)
    (out1, pool), off1 = paged_call(s, pool, table, [(0, 4), (0, 6)], **norm)
    (out2, pool), off2 = paged_call(s, pool, table, [(4, 5)], **norm)  # chunked prefill of seq 0
    np.testing.assert_allclose(out1[off1[0]:off1[1]], refs[0][0][:4], **TOL)
    np.testing.assert_allclose(out1[off1[1]:off1[2]], refs[1][0], **TOL)
    np.testing.assert_allclose(out2, refs[0][0][4:9], **TOL)
    keys, _ = gather_pages(pool, table, 0, 9)
    np.testing.assert_allclose(keys, refs[0][1], **TOL)


# ---- 0.10: batch-major, paged pool ----------------------------------------------------------

def _batch_paged(s, pool, table, spans, seq_len, start, ctx, **extra):
    q, k, v = s.batch(spans, seq_len)
    return paged_batch_attention(np.concatenate([q, k, v], -1), pool, i32(ctx), s.table[None], start, table,
                                 **s.kwargs(), **extra)


@pytest.mark.parametrize("case", [CASES[1], CASES[6]], ids=["gqa2", "mixed"])
def test_paged_batch_matches_dense(case):
    """0.10: prefill (across a page boundary), chunked prefill, decode on pages handed out out of order,
    with a spare page; every output and every written slot as the dense 0.9 cache has it."""
    c = dict(case, d=8, r=min(case["r"], 8))
    prefix, chunk = [130, 5, 70], [3, 2, 1]
    s = Seqs(c, [p + n + 1 for p, n in zip(prefix, chunk)])
    table, pool = paged_layout([p + n for p, n in zip(prefix, chunk)], 7, order=[4, 1, 6, 3, 0, 5], hkv=c["hkv"],
                               d=c["d"])
    spare = pool[:, 2].copy()  # page 2 is nobody's
    calls = [([(0, p) for p in prefix], 130, NO_START, prefix),  # prefill
             (list(zip(prefix, chunk)), 3, i32(prefix), chunk),  # chunked prefill
             ([(p + n, 1) for p, n in zip(prefix, chunk)], 1, i32([p + n for p, n in zip(prefix, chunk)]),
              [p + n + 1 for p, n in zip(prefix, chunk)])]  # decode: start = cached, ctx = total
    cache = s.empty_cache(136)
    for spans, seq_len, start, ctx in calls:
        out, pool = _batch_paged(s, pool, table, spans, seq_len, start, ctx)
        q, k, v = s.batch(spans, seq_len)
        dense_out, cache = dense_attention(q, k, v, cache, i32(ctx), s.table[None], start, **s.kwargs())
        np.testing.assert_array_equal(out, dense_out)
    for n, (p, c_) in enumerate(zip(prefix, chunk)):
        keys, vals = gather_pages(pool, table, n, p + c_ + 1)
        np.testing.assert_array_equal(keys, cache[n, 0, :, :p + c_ + 1].transpose(1, 0, 2))
        np.testing.assert_array_equal(vals, cache[n, 1, :, :p + c_ + 1].transpose(1, 0, 2))
        np.testing.assert_allclose(out[n, 0], s.ref[n][0][p + c_], **TOL)
    np.testing.assert_array_equal(pool[:, 2], spare)


def test_paged_batch_qk_norm_and_skipped_pages():
    """q/k RMSNorm inside the 0.10 plugin (norm, then RoPE), and a negative page id skips the write."""
    c = dict(hq=4, hkv=2, d=8, r=8)
    s = Seqs(c, [9, 6])
    rng = np.random.default_rng(5)
    qw, kw = rng.uniform(0.5, 1.5, 8).astype(np.float32), rng.uniform(0.5, 1.5, 8).astype(np.float32)
    refs = [torch_attention(q, k, v, s.table, q_norm=qw, k_norm=kw, eps=1e-5) for q, k, v in zip(s.q, s.k, s.v)]
    table, pool = paged_layout([9, 6], 3, order=[2, 0], hkv=2, d=8)
    norm = dict(q_norm_weight=qw, k_norm_weight=kw, rms_norm_eps=1e-5)
    out, pool = _batch_paged(s, pool, table, [(0, 4), (0, 6)], 6, NO_START, [4, 6], **norm)
    out2, pool = _batch_paged(s, pool, table, [(4, 5), (6, 0)], 5, i32([4, 6]), [5, 0], **norm)
    np.testing.assert_allclose(out[0, :4], refs[0][0][:4], **TOL)
    np.testing.assert_allclose(out[1], refs[1][0], **TOL)
    np.testing.assert_allclose(out2[0], refs[0][0][4:9], **TOL)
    keys, _ = gather_pages(pool, table, 0, 9)
    np.testing.assert_allclose(keys, refs[0][1], **TOL)
    before = paged_layout([9, 6], 3, order=[2, 0], hkv=2, d=8, seed=9)[1]  # fresh noise
    skipped = table.copy()
    skipped[0] = -1
    _, after = _batch_paged(s, before, skipped, [(0, 4), (0, 1)], 4, NO_START, [4, 1], **norm)
    np.testing.assert_array_equal(after[:, [2]], before[:, [2]])  # row 0's page untouched
    assert not np.array_equal(after[:, 0, 0], before[:, 0, 0])  # row 1 wrote its slot 0


# ---- ONNX ReferenceEvaluator ----------------------------------------------------------------

def _plugin_model(domain, input_specs, attrs):
    node = helper.make_node("AttentionPlugin", [n for n, _ in input_specs], ["attn_out", "present"],
                            domain=domain, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, None) for n, t in input_specs],
                              [helper.make_tensor_value_info("attn_out", TensorProto.FLOAT16, None),
                               helper.make_tensor_value_info("present", TensorProto.FLOAT16, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])


@pytest.mark.parametrize("extra", [{}, {"sliding_window_size": 2}, {"attention_scale": 0.37}],
                         ids=["default", "window", "scale"])
def test_reference_evaluator_dense_node(extra):
    """The node's attributes reach the kernel (a dropped window or scale would change nothing here)."""
    s = Seqs(CASES[1], [5, 3])
    q, k, v = (x.astype(np.float16) for x in s.batch([(0, 5), (0, 3)], 5))
    past = s.empty_cache(8).astype(np.float16)
    feeds = dict(q=q, k=k, v=v, past_key_values_0=past, context_lengths=i32([5, 3]),
                 rope_rotary_cos_sin=s.table[None], kvcache_start_index=NO_START)
    f16, i, f = TensorProto.FLOAT16, TensorProto.INT32, TensorProto.FLOAT
    specs = [("q", f16), ("k", f16), ("v", f16), ("past_key_values_0", f16), ("context_lengths", i),
             ("rope_rotary_cos_sin", f), ("kvcache_start_index", i)]
    attrs = dict(num_q_heads=4, num_kv_heads=2, head_size=16, enable_tree_attention=0, enable_fp8_kv_cache=0,
                 sliding_window_size=-1, qkv_scales=[1.0, 1.0, 1.0])
    attrs.update(extra)
    model = _plugin_model("trt", specs, attrs)
    from onnx.reference import ReferenceEvaluator

    out, present = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, feeds)
    heads = dict(num_q_heads=4, num_kv_heads=2, head_size=16)
    expected = dense_attention(*feeds.values(), **heads, **extra)
    np.testing.assert_array_equal(out, expected[0])
    np.testing.assert_array_equal(present, expected[1])
    if extra:
        assert np.abs(out - dense_attention(*feeds.values(), **heads)[0]).max() > 1e-2


def test_reference_evaluator_paged_node_with_qk_norm():
    c = dict(hq=4, hkv=2, d=8, r=8)
    s = Seqs(c, [7, 3])
    table, pool = paged_layout([7, 3], 2, order=[1, 0], hkv=2, d=8)
    qkv, rows, offsets = pack_tokens(s, [(0, 7), (0, 3)])
    qw, kw = np.full(8, 1.25, np.float16), np.full(8, 0.75, np.float16)
    i = TensorProto.INT32
    names = ["qkv", "past_key_values_0", "query_lengths", "rope_rotary_cos_sin", "past_lengths", "kv_page_table",
             "q_norm_gamma", "k_norm_gamma", "query_start_offsets", "attention_sequence_lengths",
             "execution_phase_marker", "context_sequence_count_carrier"]
    types = [TensorProto.FLOAT16, TensorProto.FLOAT16, i, TensorProto.FLOAT, i, i,
             TensorProto.FLOAT16, TensorProto.FLOAT16, i, i, i, i]
    values = [qkv.astype(np.float16), pool.astype(np.float16), i32([7, 3]), rows, i32([0, 0]), table, qw, kw,
              offsets, i32([7, 3]), np.zeros(1, np.int32), np.zeros(2, np.int32)]
    attrs = dict(num_q_heads=4, num_kv_heads=2, head_size=8, enable_qk_norm=1, rms_norm_eps=1e-6,
                 attention_scale=0.0, plugin_version="1")
    model = _plugin_model("trt_edgellm", list(zip(names, types)), attrs)
    out, present = reference_evaluator(model).run(None, dict(zip(names, values)))
    assert out.shape == (10, 4, 8) and present.shape == pool.shape
    direct = list(values)
    del direct[6:8]
    expected = paged_attention(*direct, num_q_heads=4, num_kv_heads=2, head_size=8,
                               q_norm_weight=qw, k_norm_weight=kw, rms_norm_eps=1e-6)
    np.testing.assert_array_equal(out, expected[0])
    np.testing.assert_array_equal(present, expected[1])
    # enable_qk_norm=1 without the gammas is a rewriter bug: the reference names it
    bad = _plugin_model("trt_edgellm", [(n, t) for j, (n, t) in enumerate(zip(names, types)) if j not in (6, 7)],
                        attrs)
    evaluator = reference_evaluator(bad)
    with pytest.raises(ValueError, match=r"10 inputs with enable_qk_norm=1 \(expected 10 without q/k-norm, 12"):
        evaluator.run(None, {n: x for n, x in zip(names, values) if n not in ("q_norm_gamma", "k_norm_gamma")})


@pytest.mark.parametrize("fp8", [False, True], ids=["fp16", "fp8"])
def test_reference_evaluator_010_node(fp8):
    """The 0.10 node: 8 inputs (gammas last), no plugin_version; told apart from 0.5's 6-input FP8 form by its
    attributes. Same numbers as the kernel called directly."""
    from onnx_rewriter.reference import fp8 as f8

    c = dict(hq=4, hkv=2, d=8, r=8)
    s = Seqs(c, [7, 3])
    table, pool = paged_layout([7, 3], 2, order=[1, 0], hkv=2, d=8)
    q, k, v = s.batch([(0, 7), (0, 3)], 7)
    qw, kw = np.full(8, 1.25, np.float16), np.full(8, 0.75, np.float16)
    i, h = TensorProto.INT32, TensorProto.FLOAT16
    cache_type, cache = (TensorProto.FLOAT8E4M3FN, pool.astype(f8.E4M3)) if fp8 else (h, pool.astype(np.float16))
    names = ["qkv", "past_key_values_0", "context_lengths", "rope_rotary_cos_sin", "kvcache_start_index",
             "kv_page_table", "q_norm_gamma", "k_norm_gamma"]
    types = [h, cache_type, i, TensorProto.FLOAT, i, i, h, h]
    values = [np.concatenate([q, k, v], -1).astype(np.float16), cache, i32([7, 3]), s.table[None], NO_START, table,
              qw, kw]
    attrs = dict(num_q_heads=4, num_kv_heads=2, head_size=8, enable_qk_norm=1, rms_norm_eps=1e-6,
                 attention_scale=0.0, enable_fp8_kv_cache=int(fp8), qkv_scales=[1.0, 0.5, 0.25] if fp8 else [1.0] * 3)
    model = _plugin_model("trt_edgellm", list(zip(names, types)), attrs)
    out, present = reference_evaluator(model).run(None, dict(zip(names, values)))
    expected = paged_batch_attention(*values[:6], num_q_heads=4, num_kv_heads=2, head_size=8, q_norm_weight=qw,
                                     k_norm_weight=kw, kv_scales=np.float32([0.5, 0.25]) if fp8 else None)
    np.testing.assert_array_equal(out, expected[0])
    np.testing.assert_array_equal(present.view(np.uint8), expected[1].view(np.uint8))


def test_ops_import_survives_schemas_in_both_domains():
    """onnx.reference refuses one op name in two domains on first import; ops.py works around it."""
    code = """
import onnx.defs
from onnx.defs import OpSchema
for domain in ("trt", "trt_edgellm"):
    onnx.defs.register_schema(OpSchema("AttentionPlugin", domain, 1, attributes=[]))
from onnx_rewriter.reference.ops import reference_evaluator
assert onnx.defs.get_schema("AttentionPlugin", "trt_edgellm").domain == "trt_edgellm"
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
