"""Tree attention of the batch-major plugin reference (contract part 3 §18.2): each tree token's output equals
plain decoding along its own path, the mask is bit-packed LSB first, padding tokens are neither attended nor
written, and K/V land in sequence order."""

from __future__ import annotations

import numpy as np

from onnx_rewriter.reference.eagle import ancestors_mask
from onnx_rewriter.reference.plugin import apply_rope, dense_attention, pack_tree_mask, tree_mask_bits

HQ, HKV, D, CAP = 4, 2, 8, 64


def _table(n=64):
    inv = 1.0 / 10000 ** (np.arange(0, D, 2) / D)
    f = np.arange(n)[:, None] * inv[None]
    return np.concatenate([np.cos(f), np.sin(f)], -1).astype(np.float32)[None]


def _run(q, k, v, cache, ctx, start, mask=None, pos=None):
    return dense_attention(q, k, v, cache, np.array([ctx], np.int32), _table(), np.array(start, np.int32),
                           num_q_heads=HQ, num_kv_heads=HKV, head_size=D, tree_mask=mask, tree_pos=pos)


def test_bit_order_lsb_first():
    allowed = np.zeros((1, 40, 40), dtype=bool)
    allowed[0, 0, 0] = allowed[0, 1, 31] = allowed[0, 2, 32] = True
    words = pack_tree_mask(allowed)
    assert words.shape == (1, 40, 2) and words.dtype == np.int32
    assert words[0, 0, 0] == 1 and words[0, 1, 0] == np.int32(-2**31) and words[0, 2, 1] == 1
    assert np.array_equal(tree_mask_bits(words, 40), allowed)


def test_tree_equals_decoding_each_path():
    rng = np.random.default_rng(0)
    p0 = 5
    parents = [-1, 0, 0, 1, 1, 2, 3]  # a root with two branches, depths 0..3
    depth = []
    for p in parents:
        depth.append(0 if p < 0 else depth[p] + 1)
    s = len(parents)
    cache = np.zeros((1, 2, HKV, CAP, D), np.float32)
    prefix = [rng.standard_normal((1, p0, n * D)).astype(np.float32) for n in (HQ, HKV, HKV)]
    _, cache = _run(*prefix, cache, p0, [])  # prefill of the committed prefix
    q, k, v = (rng.standard_normal((1, s, n * D)).astype(np.float32) for n in (HQ, HKV, HKV))
    pos = np.array([[p0 + d for d in depth] + [-1]], np.int32)  # one padding token at the end
    pad = [np.concatenate([x, np.full((1, 1, x.shape[-1]), 7.0, np.float32)], 1) for x in (q, k, v)]
    allowed = np.zeros((s + 1, s + 1), bool)
    allowed[:s, :s] = ancestors_mask(parents)
    out, present = _run(*pad, cache, p0 + s + 1, [p0], pack_tree_mask(allowed)[None], pos)
    assert np.all(out[0, s] == 0)  # padding: output 0
    assert np.all(present[0, :, :, p0 + s] == 0)  # ... and not written
    for t in range(s):
        path = []
        j = t
        while j >= 0:
            path.append(j)
            j = parents[j]
        path.reverse()
        c = cache.copy()
        for i, node in enumerate(path):
            o, c = _run(q[:, node:node + 1], k[:, node:node + 1], v[:, node:node + 1], c, p0 + i + 1, [p0 + i])
        np.testing.assert_allclose(out[0, t], o[0, 0], rtol=1e-5, atol=1e-5)
        # K of token t sits at slot p0 + t (sequence order), roped at its tree position
        want = apply_rope(k[0, t].reshape(1, HKV, D), _table()[0, pos[0, t]][None])[0]
        np.testing.assert_allclose(present[0, 0, :, p0 + t], want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(present[0, :, :, :p0], cache[0, :, :, :p0])  # the committed prefix untouched


def test_positions_one_wide_is_chunked_prefill():
    rng = np.random.default_rng(1)
    cache = np.zeros((1, 2, HKV, CAP, D), np.float32)
    x = [rng.standard_normal((1, 3, n * D)).astype(np.float32) for n in (HQ, HKV, HKV)]
    plain, _ = _run(*x, cache, 3, [2])
    tree, _ = _run(*x, cache, 3, [2], np.zeros((1, 1, 1), np.int32), np.zeros((1, 1), np.int32))
    np.testing.assert_array_equal(plain, tree)


def test_paged_tree_with_qk_norms_equals_plain_call():
    """0.11 with per-head q/k norms (Qwen3) and the tree inputs: a causal mask at positions past + i is the plain
    call, norms included (each row normed per head, then roped, as without the tree)."""
    from onnx_rewriter.reference.plugin import PAGE_SIZE, paged_attention

    rng = np.random.default_rng(5)
    hq, hkv, d, past, s = 4, 2, 16, 5, 3
    qkv = rng.standard_normal((s, (hq + 2 * hkv) * d)).astype(np.float16)
    pool = np.zeros((2, 2, PAGE_SIZE, hkv, d), np.float16)
    pool[:, :, :past] = rng.standard_normal((2, 2, past, hkv, d))
    ang = np.arange(past, past + s)[:, None] * 0.1 * (np.arange(d // 2) + 1)[None]
    rope = np.concatenate([np.cos(ang), np.sin(ang)], axis=-1).astype(np.float32)
    gq, gk = (rng.uniform(0.5, 1.5, d).astype(np.float16) for _ in range(2))
    args = (qkv, pool, np.array([s], np.int32), rope, np.array([past], np.int32), np.array([[[0], [1]]], np.int32),
            np.array([0], np.int32), np.array([past + s], np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32))
    kw = dict(num_q_heads=hq, num_kv_heads=hkv, head_size=d, q_norm_weight=gq, k_norm_weight=gk)
    plain, plain_pool = paged_attention(*args, **kw)
    tree, tree_pool = paged_attention(*args, **kw, tree_mask=pack_tree_mask(np.tril(np.ones((s, s), bool))),
                                      tree_pos=np.arange(past, past + s, dtype=np.int32))
    np.testing.assert_array_equal(tree, plain)
    np.testing.assert_array_equal(tree_pool, plain_pool)
    unnormed, _ = paged_attention(*args, num_q_heads=hq, num_kv_heads=hkv, head_size=d,
                                  tree_mask=pack_tree_mask(np.tril(np.ones((s, s), bool))),
                                  tree_pos=np.arange(past, past + s, dtype=np.int32))
    assert not np.allclose(unnormed, tree, atol=1e-3)  # the norms are applied, not dropped
