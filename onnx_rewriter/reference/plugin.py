"""CPU (numpy) reference of EdgeLLM's ``AttentionPlugin`` (contract section 2).

Every cache layout (dense ``[B, 2, Hkv, cap, D]``, the 0.10 and 0.11 paged pools) reduces to the
same per-sequence problem: roped queries at known positions attend to the keys at
positions ``0..kv_end-1`` (past keys read from the cache, new keys fresh). That core is
``attend_sequence``; the layout functions only gather, rope, scatter.

Everything is computed in float32. New keys/values enter attention at float32 precision
(the kernel also uses the fresh tensors for the current chunk); past ones are read back
from the cache in its own dtype. With an FP8 cache (``kv_scales`` = (k_scale, v_scale)) the
cache holds fp8(x / scale) and past entries are read back as fp8 * scale (reference/fp8.py).
"""

from __future__ import annotations

import numpy as np

from . import fp8

PAGE_SIZE = 128  # tokens per KV page (fixed by the 0.10 and 0.11 runtimes)

_F32 = np.float32



def _heads_f32(q, k, v, hq: int, hkv: int, d: int):
    """q [B, S, Hq·D], k and v [B, S, Hkv·D] as fp32 [B, S, heads, D]."""
    b_sz, s = np.shape(q)[:2]
    return (np.asarray(q).reshape(b_sz, s, hq, d).astype(_F32), np.asarray(k).reshape(b_sz, s, hkv, d).astype(_F32),
            np.asarray(v).reshape(b_sz, s, hkv, d).astype(_F32))

def _head_counts(num_q_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    return num_q_heads // num_kv_heads


def _scale(attention_scale, head_size: int) -> float:
    # The plugin attribute is absent or 0 when the default 1/sqrt(D) applies.
    if attention_scale is None or float(attention_scale) == 0.0:
        return 1.0 / float(np.sqrt(head_size))
    return float(attention_scale)


def apply_rope(x, cos_sin_rows, rotary_dim: int | None = None) -> np.ndarray:
    """Rotate-half RoPE over the first R dims of ``x [..., S, H, D]``; dims >= R pass through.

    ``cos_sin_rows [..., S, R]`` holds ``[cos(p·θ_0..θ_{R/2-1}) | sin(...)]`` per token.
    """
    x = np.asarray(x, dtype=_F32)
    rows = np.asarray(cos_sin_rows, dtype=_F32)
    r = rows.shape[-1] if rotary_dim is None else int(rotary_dim)
    if rows.shape[-1] != r or r % 2 or r > x.shape[-1]:
        raise ValueError(f"rope table width {rows.shape[-1]} vs rotary_dim {r}, head size {x.shape[-1]}")
    half = r // 2
    cos = rows[..., None, :half]  # broadcast over the head axis
    sin = rows[..., None, half:]
    x1, x2 = x[..., :half], x[..., half:r]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., r:]], axis=-1)


def rms_norm_heads(x, weight, eps: float) -> np.ndarray:
    """Per-head RMSNorm over the last axis (Qwen3-style q_norm / k_norm)."""
    x = np.asarray(x, dtype=_F32)
    var = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(var + _F32(eps)) * np.asarray(weight, dtype=_F32)


def attend_sequence(q, k, v, q_positions, *, sliding_window_size: int = -1, scale: float) -> np.ndarray:
    """Attention core for one sequence.

    q ``[Sq, Hq, D]`` (roped), k/v ``[Sk, Hkv, D]`` holding positions ``0..Sk-1``
    (k roped). A query at position p sees keys j with j <= p and, when W > 0, p - W < j
    (HF Mistral convention). Query head h uses KV head h // (Hq/Hkv). Returns ``[Sq, Hq, D]``.
    """
    q = np.asarray(q, dtype=_F32)
    k = np.asarray(k, dtype=_F32)
    v = np.asarray(v, dtype=_F32)
    sq, hq, d = q.shape
    sk, hkv, _ = k.shape
    group = _head_counts(hq, hkv)
    qp = np.asarray(q_positions, dtype=np.int64)[:, None]
    kp = np.arange(sk, dtype=np.int64)[None, :]
    mask = kp <= qp
    if sliding_window_size is not None and sliding_window_size > 0:
        mask &= kp > qp - sliding_window_size
    qg = q.reshape(sq, hkv, group, d)
    scores = np.einsum("qhgd,khd->hgqk", qg, k) * _F32(scale)
    scores = np.where(mask, scores, -np.inf)
    peak = scores.max(axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)  # fully masked rows give 0, not NaN
    prob = np.exp(scores - peak)
    denom = prob.sum(axis=-1, keepdims=True)
    prob = prob / np.where(denom > 0, denom, 1.0)
    out = np.einsum("hgqk,khd->qhgd", prob.astype(_F32), v)
    return out.reshape(sq, hq, d)


def _cache_codec(kv_scales, cache):
    """(read, write) for cache entries of K (i = 0) or V (i = 1): plain casts, or the FP8 cache's encode/decode."""
    is_fp8 = np.asarray(cache).dtype == fp8.E4M3
    if (kv_scales is not None) != is_fp8:
        raise ValueError(f"KV cache dtype {np.asarray(cache).dtype} with "
                         f"{'FP8 scales' if kv_scales is not None else 'no FP8 scales'}: enable_fp8_kv_cache and "
                         "the cache dtype disagree")
    if kv_scales is None:
        return (lambda x, i: np.asarray(x).astype(_F32)), (lambda x, i: x)
    scales = [float(s) for s in np.asarray(kv_scales, dtype=_F32).reshape(-1)]
    if len(scales) != 2 or not all(np.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"FP8 KV scales must be 2 positive numbers (k, v), got {scales}")
    return (lambda x, i: fp8.decode(x, scales[i])), (lambda x, i: fp8.encode(x, scales[i]))


def _dense_mode(start, batch: int, seq: int) -> str:
    if start.size == 0:
        return "prefill"
    if start.size != batch:
        raise ValueError(f"kvcache_start_index has {start.size} entries for batch {batch}")
    return "chunked" if seq > 1 else "decode"


class _DenseCache:
    """The 0.5/0.9 cache ``[B, 2, Hkv, cap, D]``: row b's slot j at ``[b, 0|1, :, j]``."""

    def __init__(self, present, read, write):
        self.present, self.read, self.write = present, read, write

    def capacity(self, b: int) -> int:
        return self.present.shape[3]

    def past(self, b: int, which: int, n: int) -> np.ndarray:
        return self.read(self.present[b, which, :, :n], which).transpose(1, 0, 2)

    def put(self, b: int, which: int, first: int, x) -> None:
        self.present[b, which, :, first:first + len(x)] = self.write(x.transpose(1, 0, 2), which)


class _PagedCache:
    """The 0.10 pool ``[2, num_pages, 128, Hkv, D]`` viewed flat as ``[2·num_pages, 128, Hkv, D]``: row b's
    slot j at page ``kv_page_table[b, 0|1, j // 128]``, offset ``j % 128``; a negative page skips the write."""

    def __init__(self, present, page_table, read, write):
        self.flat = present.reshape(2 * present.shape[1], *present.shape[2:])  # a view: writes land in present
        self.table, self.read, self.write = np.asarray(page_table).astype(np.int64), read, write
        if self.table.ndim != 3 or self.table.shape[1] != 2:
            raise ValueError(f"kv_page_table must be [B, 2, pages], got {self.table.shape}")

    def capacity(self, b: int) -> int:
        return self.table.shape[2] * PAGE_SIZE

    def past(self, b: int, which: int, n: int) -> np.ndarray:
        pages, slots = _page_slots(self.table[b, which], np.arange(n), self.flat.shape[0])
        return self.read(self.flat[pages, slots], which)

    def put(self, b: int, which: int, first: int, x) -> None:
        positions = first + np.arange(len(x))
        pages = self.table[b, which][positions // PAGE_SIZE]
        keep = pages >= 0
        if np.any(pages[keep] >= self.flat.shape[0]):
            raise ValueError(f"row {b}: page table entry beyond the pool's {self.flat.shape[0]} pages")
        self.flat[pages[keep], positions[keep] % PAGE_SIZE] = self.write(np.asarray(x)[keep], which)


def _rope_and_norm(x, w, rows, eps: float, post_rope: bool = False) -> np.ndarray:
    """RoPE, after (or, ``post_rope``, before) the per-head RMSNorm with gamma ``w`` when there is one."""
    if w is None:
        return apply_rope(x, rows)
    if post_rope:
        return rms_norm_heads(apply_rope(x, rows), w, eps)
    return apply_rope(rms_norm_heads(x, w, eps), rows)


def _batch_attention(q, k, v, cache, context_lengths, rope_cos_sin, kvcache_start_index, *, num_q_heads: int,
                     num_kv_heads: int, head_size: int, sliding_window_size: int = -1, attention_scale=None,
                     q_norm_weight=None, k_norm_weight=None, rms_norm_eps: float = 1e-6):
    """The batch-major plugins (0.5, 0.9 dense; 0.10 paged) over a cache object (``_DenseCache`` /
    ``_PagedCache``). Row b's first n tokens are real, at positions ``past + t``:
      prefill  (start shape [0]):   past = 0,            n = context_lengths[b]
      chunked  (start [B], S > 1):  past = start[b],     n = context_lengths[b]
      decode   (start [B], S == 1): past = ctx[b] - 1,   n = 1   (ctx = total incl. the new token)
    Returns ``out [B,S,Hq,D]`` (q's dtype, padded rows 0); the real tokens' roped K / raw V are written to the
    cache at ``[past, past+n)``; padded slots keep their old contents (the kernel writes junk there; nothing
    reads it)."""
    hq, hkv, d = num_q_heads, num_kv_heads, head_size
    _head_counts(hq, hkv)
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight go together")
    q = np.asarray(q)
    b_sz, s = q.shape[:2]
    qf, kf, vf = _heads_f32(q, k, v, hq, hkv, d)
    ctx = np.asarray(context_lengths).reshape(-1).astype(np.int64)
    start = np.asarray(kvcache_start_index).reshape(-1).astype(np.int64)
    table = np.asarray(rope_cos_sin, dtype=_F32)
    if table.ndim != 3 or table.shape[0] not in (1, b_sz):
        raise ValueError(f"rope_cos_sin must be [1 or B, P, R], got {table.shape}")
    mode = _dense_mode(start, b_sz, s)
    scale = _scale(attention_scale, d)
    out = np.zeros((b_sz, s, hq, d), dtype=_F32)

    for b in range(b_sz):
        if mode == "decode":
            past, n = int(ctx[b]) - 1, 1
            if past < 0:
                continue  # inactive row: nothing to compute or write
        else:
            past, n = (0 if mode == "prefill" else int(start[b])), int(ctx[b])
        if not 0 <= n <= s:
            raise ValueError(f"row {b}: {n} real tokens in a call of {s}")
        end = past + n
        rows = table[b if table.shape[0] == b_sz else 0]
        if end > cache.capacity(b) or end > rows.shape[0]:
            raise ValueError(f"row {b}: kv end {end} exceeds cache capacity {cache.capacity(b)} "
                             f"or rope rows {rows.shape[0]}")
        if n == 0:
            continue
        qr = _rope_and_norm(qf[b, :n], q_norm_weight, rows[past:end], rms_norm_eps)
        kr = _rope_and_norm(kf[b, :n], k_norm_weight, rows[past:end], rms_norm_eps)
        keys = np.concatenate([cache.past(b, 0, past), kr])
        vals = np.concatenate([cache.past(b, 1, past), vf[b, :n]])
        out[b, :n] = attend_sequence(qr, keys, vals, past + np.arange(n),
                                     sliding_window_size=sliding_window_size, scale=scale)
        cache.put(b, 0, past, kr)
        cache.put(b, 1, past, vf[b, :n])
    return out.astype(q.dtype)


def tree_mask_bits(mask, s: int) -> np.ndarray:
    """The bit-packed tree mask ``[..., S, W]`` int32 as booleans ``[..., S, S]``: token j is bit (j mod 32) of
    word j // 32, least significant bit first (contract part 3 §18.2)."""
    words = np.asarray(mask).astype(np.int64) & 0xFFFFFFFF
    j = np.arange(s)
    if words.shape[-1] * 32 < s:
        raise ValueError(f"tree mask has {words.shape[-1]} words per row for {s} tokens")
    return ((words[..., j // 32] >> (j % 32)) & 1).astype(bool)


def pack_tree_mask(allowed) -> np.ndarray:
    """Inverse of tree_mask_bits: booleans ``[..., S, S]`` -> int32 ``[..., S, ceil(S/32)]``."""
    allowed = np.asarray(allowed, dtype=bool)
    s = allowed.shape[-1]
    words = np.zeros(allowed.shape[:-1] + ((s + 31) // 32,), dtype=np.int64)
    for j in range(s):
        words[..., j // 32] |= allowed[..., j].astype(np.int64) << (j % 32)
    return words.astype(np.uint32).view(np.int32)


def attend_allowed(q, k, v, allowed, *, scale: float) -> np.ndarray:
    """q ``[Sq, Hq, D]`` over k/v ``[Sk, Hkv, D]`` where ``allowed [Sq, Sk]`` (fp32, GQA by head groups)."""
    q, k, v = (np.asarray(x, dtype=_F32) for x in (q, k, v))
    sq, hq, d = q.shape
    hkv = k.shape[1]
    group = _head_counts(hq, hkv)
    scores = np.einsum("qhgd,khd->hgqk", q.reshape(sq, hkv, group, d), k) * _F32(scale)
    scores = np.where(allowed, scores, -np.inf)
    peak = scores.max(axis=-1, keepdims=True)
    prob = np.exp(scores - np.where(np.isfinite(peak), peak, 0.0))
    denom = prob.sum(axis=-1, keepdims=True)
    prob = prob / np.where(denom > 0, denom, 1.0)
    return np.einsum("hgqk,khd->qhgd", prob.astype(_F32), v).reshape(sq, hq, d)


def _tree_attention(q, k, v, cache, context_lengths, rope_cos_sin, tree_mask, tree_pos, *, num_q_heads: int,
                    num_kv_heads: int, head_size: int, sliding_window_size: int = -1, attention_scale=None,
                    q_norm_weight=None, k_norm_weight=None, rms_norm_eps: float = 1e-6):
    """Tree decoding of the batch-major plugins (contract part 3 §18.2). Row b's S tokens follow its committed
    prefix of P0 = context_lengths[b] - S cache slots; token t is roped at table row ``tree_pos[b, t]`` and
    attends to the whole prefix plus the new tokens whose bit is set in its row of ``tree_mask``; a token with
    position -1 is padding (output 0, nothing written). Token t's K/V go to slot P0 + t (sequence order)."""
    if sliding_window_size is not None and sliding_window_size > 0:
        raise NotImplementedError("AttentionPlugin reference does not model tree attention with a sliding window")
    hq, hkv, d = num_q_heads, num_kv_heads, head_size
    q = np.asarray(q)
    b_sz, s = q.shape[:2]
    qf, kf, vf = _heads_f32(q, k, v, hq, hkv, d)
    ctx = np.asarray(context_lengths).reshape(-1).astype(np.int64)
    pos = np.asarray(tree_pos).astype(np.int64).reshape(b_sz, s)
    bits = tree_mask_bits(tree_mask, s).reshape(b_sz, s, s)
    table = np.asarray(rope_cos_sin, dtype=_F32)
    scale = _scale(attention_scale, d)
    out = np.zeros((b_sz, s, hq, d), dtype=_F32)
    for b in range(b_sz):
        p0 = int(ctx[b]) - s
        real = np.flatnonzero(pos[b] >= 0)
        if p0 < 0 or real.size == 0:
            continue
        rows = table[b if table.shape[0] == b_sz else 0]
        if p0 + s > cache.capacity(b) or pos[b].max() >= rows.shape[0]:
            raise ValueError(f"row {b}: tree of {s} after {p0} tokens exceeds the cache or the rope table")
        r = rows[np.maximum(pos[b], 0)]
        qr = _rope_and_norm(qf[b], q_norm_weight, r, rms_norm_eps)
        kr = _rope_and_norm(kf[b], k_norm_weight, r, rms_norm_eps)
        keys = np.concatenate([cache.past(b, 0, p0), kr])
        vals = np.concatenate([cache.past(b, 1, p0), vf[b]])
        allowed = np.concatenate([np.ones((s, p0), dtype=bool), bits[b]], axis=1)
        out[b, real] = attend_allowed(qr[real], keys, vals, allowed[real], scale=scale)
        for t in real:
            cache.put(b, 0, p0 + int(t), kr[t:t + 1])
            cache.put(b, 1, p0 + int(t), vf[b, t:t + 1])
    return out.astype(q.dtype)


def dense_attention(q, k, v, past_kv, context_lengths, rope_cos_sin, kvcache_start_index, *,
                    num_q_heads: int, num_kv_heads: int, head_size: int,
                    sliding_window_size: int = -1, attention_scale=None, kv_scales=None,
                    tree_mask=None, tree_pos=None):
    """0.9 plugin: q ``[B,S,Hq·D]``, k/v ``[B,S,Hkv·D]``, past_kv ``[B,2,Hkv,cap,D]`` (``_batch_attention``).
    With the tree inputs (``enable_tree_attention=1``): tree decoding when kvcache_start_index is ``[B]`` and
    ``tree_pos`` is ``[B, S]`` with S > 1 (``_tree_attention``); otherwise (``[B, 1]`` positions, a decode
    step, a prefill) the usual modes. Returns ``out [B,S,Hq,D]`` and ``present`` (past_kv's dtype)."""
    past_kv = np.asarray(past_kv)
    present = past_kv.copy()
    cache = _DenseCache(present, *_cache_codec(kv_scales, past_kv))
    kw = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size,
              sliding_window_size=sliding_window_size, attention_scale=attention_scale)
    b_sz, s = np.asarray(q).shape[:2]
    if tree_pos is not None and np.asarray(kvcache_start_index).size == b_sz and s > 1 \
            and np.asarray(tree_pos).shape[-1] == s:
        return _tree_attention(q, k, v, cache, context_lengths, rope_cos_sin, tree_mask, tree_pos, **kw), present
    out = _batch_attention(q, k, v, cache, context_lengths, rope_cos_sin, kvcache_start_index, **kw)
    return out, present


def paged_batch_attention(qkv, kv_pool, context_lengths, rope_cos_sin, kvcache_start_index, kv_page_table, *,
                          num_q_heads: int, num_kv_heads: int, head_size: int, sliding_window_size: int = -1,
                          attention_scale=None, q_norm_weight=None, k_norm_weight=None, rms_norm_eps: float = 1e-6,
                          kv_scales=None, tree_mask=None, tree_pos=None):
    """0.10 plugin (contract 3 §17): batch-major packed ``qkv [B,S,(Hq+2Hkv)·D]``, the paged pool
    ``[2,num_pages,128,Hkv,D]`` and ``kv_page_table [B,2,pages]``; 0.9's modes (``_batch_attention``), q/k
    RMSNorm in the plugin before RoPE. Returns ``out [B,S,Hq,D]`` (qkv's dtype) and the pool (its own dtype)."""
    q, k, v = split_qkv(qkv, num_q_heads, num_kv_heads, head_size)
    kv_pool = np.asarray(kv_pool)
    present = kv_pool.copy()
    cache = _PagedCache(present, kv_page_table, *_cache_codec(kv_scales, kv_pool))
    b_sz, s = np.asarray(q).shape[:2]
    if tree_pos is not None and np.asarray(kvcache_start_index).size == b_sz and s > 1 \
            and np.asarray(tree_pos).shape[-1] == s:  # tree decoding, as the dense plugin (§17.2, §18.2)
        out = _tree_attention(q, k, v, cache, context_lengths, rope_cos_sin, tree_mask, tree_pos,
                              num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                              sliding_window_size=sliding_window_size, attention_scale=attention_scale,
                              q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, rms_norm_eps=rms_norm_eps)
        return out, present
    out = _batch_attention(q, k, v, cache, context_lengths, rope_cos_sin, kvcache_start_index,
                           num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                           sliding_window_size=sliding_window_size, attention_scale=attention_scale,
                           q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, rms_norm_eps=rms_norm_eps)
    return out, present


def split_qkv(qkv, num_q_heads: int, num_kv_heads: int, head_size: int):
    """Split packed ``[..., (Hq+2Hkv)·D]`` into q ``[..., Hq·D]``, k, v ``[..., Hkv·D]``."""
    qkv = np.asarray(qkv)
    nq, nkv = num_q_heads * head_size, num_kv_heads * head_size
    if qkv.shape[-1] != nq + 2 * nkv:
        raise ValueError(f"packed qkv last dim {qkv.shape[-1]} != (Hq+2Hkv)·D = {nq + 2 * nkv}")
    return qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]


def packed_qkv_dense_attention(qkv, past_kv, context_lengths, rope_cos_sin, kvcache_start_index, *,
                               num_q_heads: int, num_kv_heads: int, head_size: int,
                               sliding_window_size: int = -1, attention_scale=None, kv_scales=None,
                               tree_mask=None, tree_pos=None):
    """0.5 plugin: one packed ``qkv [B,S,(Hq+2Hkv)·D]``, then the 4 dense inputs."""
    q, k, v = split_qkv(qkv, num_q_heads, num_kv_heads, head_size)
    return dense_attention(q, k, v, past_kv, context_lengths, rope_cos_sin, kvcache_start_index,
                           num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                           sliding_window_size=sliding_window_size, attention_scale=attention_scale,
                           kv_scales=kv_scales, tree_mask=tree_mask, tree_pos=tree_pos)


def _page_slots(page_row, positions, n_flat_pages: int):
    """Flat pool (page, slot) indices for token positions through one page-table row."""
    idx = positions // PAGE_SIZE
    if np.any(idx >= page_row.shape[0]):
        raise ValueError(f"position {positions.max()} needs more than {page_row.shape[0]} pages")
    pages = page_row[idx]
    if np.any(pages < 0) or np.any(pages >= n_flat_pages):
        raise ValueError(f"page table entry out of range for positions up to {positions.max()}")
    return pages, positions % PAGE_SIZE


def paged_attention(qkv, kv_pool, query_lengths, rope_cos_sin, past_lengths, kv_page_table,
                    query_start_offsets, attention_sequence_lengths, execution_phase_marker,
                    context_sequence_count_carrier, *, num_q_heads: int, num_kv_heads: int,
                    head_size: int, sliding_window_size: int = -1, attention_scale=None,
                    q_norm_weight=None, k_norm_weight=None, rms_norm_eps: float = 1e-6,
                    qk_norm_post_rope: bool = False, kv_scales=None, tree_mask=None, tree_pos=None):
    """0.11 plugin: token-major packed ``qkv [T,(Hq+2Hkv)·D]``, pool ``[2,num_pages,128,Hkv,D]``.
    With the tree inputs (``packed_attention_mask [T, W]``, ``attention_position_ids [T]``): see
    ``_paged_tree_attention`` (contract part 3 §18.3, partly inferred).

    Sequence n owns tokens ``query_start_offsets[n] : +query_lengths[n]`` at positions
    ``past_lengths[n] + t``; its token i lives at flat page ``kv_page_table[n, 0|1, i // 128]``
    (K|V), slot ``i % 128``. ``rope_cos_sin [T,R]`` has one row per token. Tokens not
    covered by any sequence get output 0. ``attention_sequence_lengths`` (= past + query),
    ``execution_phase_marker`` and ``context_sequence_count_carrier`` are shape-only hints the
    kernel uses to pick a code path; they carry no extra semantics, so they are not read.
    Returns ``out [T,Hq,D]`` (qkv's dtype) and the updated pool (its own dtype).
    """
    if tree_mask is not None:
        return _paged_tree_attention(qkv, kv_pool, query_lengths, rope_cos_sin, past_lengths, kv_page_table,
                                     query_start_offsets, attention_sequence_lengths, tree_mask, tree_pos,
                                     num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                                     sliding_window_size=sliding_window_size, attention_scale=attention_scale,
                                     kv_scales=kv_scales, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight,
                                     rms_norm_eps=rms_norm_eps, qk_norm_post_rope=qk_norm_post_rope)
    del attention_sequence_lengths, execution_phase_marker, context_sequence_count_carrier
    hq, hkv, d = num_q_heads, num_kv_heads, head_size
    _head_counts(hq, hkv)
    qkv = np.asarray(qkv)
    t_all = qkv.shape[0]
    q, k, v = (x.reshape(t_all, -1, d).astype(_F32) for x in split_qkv(qkv, hq, hkv, d))
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight go together")
    table = np.asarray(rope_cos_sin, dtype=_F32).reshape(t_all, -1)

    kv_pool = np.asarray(kv_pool)
    present = kv_pool.copy()
    read, write = _cache_codec(kv_scales, kv_pool)
    flat = present.reshape(2 * kv_pool.shape[1], PAGE_SIZE, hkv, d)  # a view: writes land in present
    page_table = np.asarray(kv_page_table).astype(np.int64)
    qlen = np.asarray(query_lengths).reshape(-1).astype(np.int64)
    past_len = np.asarray(past_lengths).reshape(-1).astype(np.int64)
    offsets = np.asarray(query_start_offsets).reshape(-1).astype(np.int64)
    scale = _scale(attention_scale, d)
    out = np.zeros((t_all, hq, d), dtype=_F32)

    for n in range(qlen.shape[0]):
        first, count, past = int(offsets[n]), int(qlen[n]), int(past_len[n])
        if count <= 0:
            continue
        tok = slice(first, first + count)
        if first + count > t_all:
            raise ValueError(f"sequence {n}: tokens {first}..{first + count} beyond T={t_all}")
        qr = _rope_and_norm(q[tok], q_norm_weight, table[tok], rms_norm_eps, qk_norm_post_rope)
        kr = _rope_and_norm(k[tok], k_norm_weight, table[tok], rms_norm_eps, qk_norm_post_rope)
        old = np.arange(past)
        new = past + np.arange(count)
        kpg, kslot = _page_slots(page_table[n, 0], old, flat.shape[0])
        vpg, vslot = _page_slots(page_table[n, 1], old, flat.shape[0])
        keys = np.concatenate([read(flat[kpg, kslot], 0), kr])
        vals = np.concatenate([read(flat[vpg, vslot], 1), v[tok]])
        out[tok] = attend_sequence(qr, keys, vals, new, sliding_window_size=sliding_window_size, scale=scale)
        kpg, kslot = _page_slots(page_table[n, 0], new, flat.shape[0])
        vpg, vslot = _page_slots(page_table[n, 1], new, flat.shape[0])
        flat[kpg, kslot] = write(kr, 0)
        flat[vpg, vslot] = write(v[tok], 1)
    return out.astype(qkv.dtype), present


def _paged_tree_attention(qkv, kv_pool, query_lengths, rope_cos_sin, past_lengths, kv_page_table,
                          query_start_offsets, attention_sequence_lengths, tree_mask, tree_pos, *, num_q_heads: int,
                          num_kv_heads: int, head_size: int, sliding_window_size: int = -1, attention_scale=None,
                          kv_scales=None, q_norm_weight=None, k_norm_weight=None, rms_norm_eps: float = 1e-6,
                          qk_norm_post_rope: bool = False):
    """0.11 tree attention, as contract part 3 §18.3 infers it (not yet confirmed on a device). Sequence n owns
    the Wq = qso[n+1] - qso[n] rows from qso[n] (its physical query width); its committed prefix is
    P0 = attention_sequence_lengths[n] - Wq cache slots; row i (position ``tree_pos[t]``, -1: padding) attends
    to the prefix and to the rows of its sequence whose bit is set in its row of ``tree_mask`` (LSB first,
    columns relative to qso[n]), and its K/V go to slot past_lengths[n] + i. A plain call (causal bits,
    positions past + i) is the same attention as without the tree inputs. The rope rows are per token; q/k norms
    (Qwen3) as in the plain call: per head, then RoPE (or after it, ``qk_norm_post_rope``)."""
    if sliding_window_size is not None and sliding_window_size > 0:
        raise NotImplementedError("AttentionPlugin reference does not model tree attention with a sliding window")
    hq, hkv, d = num_q_heads, num_kv_heads, head_size
    qkv = np.asarray(qkv)
    t_all = qkv.shape[0]
    q, k, v = (x.reshape(t_all, -1, d).astype(_F32) for x in split_qkv(qkv, hq, hkv, d))
    table = np.asarray(rope_cos_sin, dtype=_F32).reshape(t_all, -1)
    kv_pool = np.asarray(kv_pool)
    present = kv_pool.copy()
    read, write = _cache_codec(kv_scales, kv_pool)
    flat = present.reshape(2 * kv_pool.shape[1], PAGE_SIZE, hkv, d)
    page_table = np.asarray(kv_page_table).astype(np.int64)
    qlen = np.asarray(query_lengths).reshape(-1).astype(np.int64)
    past_len = np.asarray(past_lengths).reshape(-1).astype(np.int64)
    asl = np.asarray(attention_sequence_lengths).reshape(-1).astype(np.int64)
    offsets = np.asarray(query_start_offsets).reshape(-1).astype(np.int64)
    pos = np.asarray(tree_pos).reshape(-1).astype(np.int64)
    words = np.asarray(tree_mask)
    scale = _scale(attention_scale, d)
    out = np.zeros((t_all, hq, d), dtype=_F32)
    for n in range(qlen.shape[0]):
        first = int(offsets[n])
        wq = int(offsets[n + 1]) - first if n + 1 < offsets.shape[0] else int(qlen[n])
        if qlen[n] <= 0 or wq <= 0:
            continue
        p0 = int(asl[n]) - wq
        rows = np.arange(first, first + wq)
        real = rows[pos[rows] >= 0]
        bits = tree_mask_bits(words[rows], wq)
        qr = _rope_and_norm(q[rows], q_norm_weight, table[rows], rms_norm_eps, qk_norm_post_rope)
        kr = _rope_and_norm(k[rows], k_norm_weight, table[rows], rms_norm_eps, qk_norm_post_rope)
        old = np.arange(p0)
        kpg, kslot = _page_slots(page_table[n, 0], old, flat.shape[0])
        vpg, vslot = _page_slots(page_table[n, 1], old, flat.shape[0])
        keys = np.concatenate([read(flat[kpg, kslot], 0), kr])
        vals = np.concatenate([read(flat[vpg, vslot], 1), v[rows]])
        allowed = np.concatenate([np.ones((wq, p0), dtype=bool), bits], axis=1)
        i = real - first
        out[real] = attend_allowed(qr[i], keys, vals, allowed[i], scale=scale)
        slots = int(past_len[n]) + i
        kpg, kslot = _page_slots(page_table[n, 0], slots, flat.shape[0])
        vpg, vslot = _page_slots(page_table[n, 1], slots, flat.shape[0])
        flat[kpg, kslot] = write(kr[i], 0)
        flat[vpg, vslot] = write(v[real], 1)
    return out.astype(qkv.dtype), present
