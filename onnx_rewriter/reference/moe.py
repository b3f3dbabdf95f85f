"""CPU reference of EdgeLLM's MoE plugins: ``Fp16MoePlugin`` and ``Int4MoePlugin`` (contract part 3 §15.3).

Both take fp32 router logits ``[rows, E]`` and fp16 hidden states (``[B, S, H]`` on runtimes <= 0.10,
``[T, H]`` on 0.11), do softmax, top-k and the weighted combine inside, and return fp16 of the hidden
states' shape. What differs is the weight layout, and above all the order of FC1's rows (gate / up):

- ``Int4MoePlugin``: FC1 rows ``[gate(I); up(I)]``; weights as Marlin INT4 bytes (``unpack_marlin`` below;
  ``features/moe/layout.py`` packs them) with fp16 group scales, w = (U - 8) * s; renormalizes the top-k
  weights always (no attribute).
- ``Fp16MoePlugin``: ``fc1_weights`` fp16 ``[E, 2I, H]`` whose rows interleave 64-row blocks *starting with
  up* (``[up[0:64], gate[0:64], up[64:128], ...]``), ``fc2_weights`` fp16 ``[E, H, I]``; renormalizes only
  where ``norm_topk_prob`` = 1.

Precision, per the contract: softmax, top-k and the routing weights in fp32; each expert's GEMMs read fp16
inputs and weights, accumulate in fp32 and round their output to fp16; silu in fp32 from the fp16 gate,
rounded to fp16, times up in fp16. The combine sum_j w_j * d_j is accumulated in fp32 and rounded once to
fp16 *(inference: the contract does not say where the combine rounds)*. Top-k ties go to the lower expert
index, as torch.topk does on CPU *(inference)*.
"""

from __future__ import annotations

import hashlib

import numpy as np

# node name -> (E, the experts it routed some row to): filled while a graph runs, read and cleared by verify
EXPERTS_USED: dict = {}
# None, or a list verify reads (verification/moe_routing.py): (node, router logits) per plugin call
ROUTER_LOG: list | None = None
_DEQUANTIZED: dict = {}  # Int4MoePlugin weights dequantized, per layer (by the bytes' digest), up to _CACHE_BYTES
_CACHE_BYTES = 256 << 20

# Fp16MoePlugin's FC1 interleave block (rows of up, then of gate, alternately).
FP16_INTERLEAVE = 64
# Fp16MoePlugin's only expert counts (validateAttributes).
FP16_EXPERTS = (128, 256)
# Int4MoePlugin `activation_type` values: 0 SwiGLU (all runtimes), 5 GeGLU-tanh (0.10 on).
INT4_SWIGLU = 0
# Fp16MoePlugin `activation_type`: 2 SwiGLU, 4 ReLU^2.
FP16_SWIGLU = 2


# ------------------------------------------------------------------ routing

def route(router_logits: np.ndarray, top_k: int, renormalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """(expert ids [rows, k] int64, weights [rows, k] fp32): softmax over all E in fp32, the k largest
    probabilities (ties: lower index first), divided by their sum where `renormalize`."""
    logits = np.asarray(router_logits, dtype=np.float32)
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z, dtype=np.float32)
    p = (e / e.sum(axis=-1, keepdims=True, dtype=np.float32)).astype(np.float32)
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, idx, axis=-1)
    if renormalize:
        w = (w / w.sum(axis=-1, keepdims=True, dtype=np.float32)).astype(np.float32)
    return idx.astype(np.int64), w


def topk_mass(router_logits: np.ndarray, top_k: int) -> np.ndarray:
    """sum of the top-k softmax probabilities per row, fp32 [rows, 1]: the factor that turns renormalized
    routing weights back into plain ones (Qwen2-MoE's norm_topk_prob false on Int4MoePlugin, contract §15.6)."""
    _, w = route(router_logits, top_k, renormalize=False)
    return w.sum(axis=-1, keepdims=True, dtype=np.float32)


def record_use(node: str, router_logits, top_k: int) -> None:
    """Note which experts node `node` routed rows to (verify reports how many of E each layer used)."""
    idx, _ = route(router_logits, top_k, renormalize=False)
    e = np.asarray(router_logits).shape[-1]
    EXPERTS_USED.setdefault(node, (e, set()))[1].update(int(i) for i in np.unique(idx))
    if ROUTER_LOG is not None:
        ROUTER_LOG.append((node, np.array(router_logits, dtype=np.float32)))


# ------------------------------------------------------------------ one expert, fp16 like the kernels

def _gemm16(x16: np.ndarray, w16: np.ndarray) -> np.ndarray:
    """x [rows, K] fp16 @ w[N, K]^T fp16, fp32 accumulation, fp16 result."""
    return (x16.astype(np.float32) @ w16.astype(np.float32).T).astype(np.float16)


def swiglu(gate16: np.ndarray, up16: np.ndarray) -> np.ndarray:
    """fp16(silu(gate)) * up in fp16 (silu in fp32 from the fp16 gate)."""
    g = gate16.astype(np.float32)
    with np.errstate(over="ignore"):
        silu = (g / (1.0 + np.exp(-g))).astype(np.float16)
    return (silu.astype(np.float32) * up16.astype(np.float32)).astype(np.float16)


def expert_mlp(x16: np.ndarray, gate16: np.ndarray, up16: np.ndarray, down16: np.ndarray) -> np.ndarray:
    """One SwiGLU expert on rows x [rows, H] fp16 with weights gate/up [I, H], down [H, I] fp16 -> fp16 [rows, H]."""
    return _gemm16(swiglu(_gemm16(x16, gate16), _gemm16(x16, up16)), down16)


def moe(router_logits, hidden_states, gate, up, down, *, top_k: int, renormalize: bool) -> np.ndarray:
    """The routed MoE block: gate/up [E, I, H], down [E, H, I] (fp16, dequantized where INT4).

    Returns fp16 of hidden_states' shape. Only the experts some row picked are computed."""
    x = np.asarray(hidden_states)
    h = x.shape[-1]
    x16 = x.reshape(-1, h).astype(np.float16)
    logits = np.asarray(router_logits, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[0] != x16.shape[0] or logits.shape[1] != gate.shape[0]:
        raise ValueError(f"MoE plugin: router_logits {logits.shape} vs {x16.shape[0]} rows and {gate.shape[0]} experts")
    idx, w = route(logits, top_k, renormalize)
    acc = np.zeros((x16.shape[0], h), dtype=np.float32)
    for e in np.unique(idx):
        rows, slot = np.nonzero(idx == e)
        d = expert_mlp(x16[rows], gate[e], up[e], down[e])
        acc[rows] += w[rows, slot][:, None] * d.astype(np.float32)
    return acc.astype(np.float16).reshape(x.shape)


# ------------------------------------------------------------------ FC1 row orders

def fp16_fc1_split(fc1: np.ndarray, inter: int) -> tuple[np.ndarray, np.ndarray]:
    """Fp16MoePlugin fc1 [E, 2I, H] -> (gate [E, I, H], up [E, I, H]): 64-row blocks, up first."""
    e, rows, h = fc1.shape
    b = FP16_INTERLEAVE
    if rows != 2 * inter or inter % b:
        raise ValueError(f"Fp16MoePlugin fc1_weights has {rows} rows, expected 2 * moe_inter_size = {2 * inter} "
                         f"with moe_inter_size a multiple of {b}")
    blocks = fc1.reshape(e, inter // b, 2, b, h)  # [E, I/64, (up, gate), 64, H]
    return blocks[:, :, 1].reshape(e, inter, h), blocks[:, :, 0].reshape(e, inter, h)


def int4_fc1_split(w: np.ndarray, inter: int) -> tuple[np.ndarray, np.ndarray]:
    """Int4MoePlugin FC1 rows [E, 2I, H] (dequantized) -> (gate, up): gate first, then up."""
    if w.shape[1] != 2 * inter:
        raise ValueError(f"Int4MoePlugin FC1 has {w.shape[1]} rows, expected 2 * moe_inter_size = {2 * inter}")
    return w[:, :inter], w[:, inter:]


# ------------------------------------------------------------------ Marlin INT4 bytes (read side)

# Nibble i of a Marlin word holds U[64 nt + c_i, 16 kt + r_i] with (r_i, c_i) offsets from (2r, c0):
_MARLIN_OFFSETS = ((0, 0), (8, 0), (0, 8), (8, 8), (1, 0), (9, 0), (1, 8), (9, 8))


def marlin_index(n: int, k: int):
    """(word column [K/16, N/64, 128], [8 (n, k) index arrays of the same shape]) of the Marlin layout:
    word M[kt, 128 nt + 4 (t mod 32) + t // 32] of lane t, nibble i = U[n_i, k_i] (contract §15.4)."""
    if k % 16 or n % 64:
        raise ValueError(f"Marlin layout needs K % 16 == 0 and N % 64 == 0 (N={n}, K={k})")
    kt, nt, t = np.ix_(np.arange(k // 16), np.arange(n // 64), np.arange(128))
    r, q = t % 4, t // 4
    c0 = q % 8 + 16 * (q // 8)
    col = 128 * nt + 4 * (t % 32) + t // 32 + 0 * kt
    fields = [(64 * nt + c0 + dc + 0 * kt, 16 * kt + 2 * r + dr + 0 * nt) for dr, dc in _MARLIN_OFFSETS]
    return col, fields


def unpack_marlin(qweight: np.ndarray, n: int, k: int) -> np.ndarray:
    """int8 [K/16, 8N] (one expert) -> U[N, K] in [0, 15]."""
    b = np.ascontiguousarray(np.asarray(qweight, dtype=np.int8))
    if b.shape != (k // 16, 8 * n):
        raise ValueError(f"Marlin qweight has shape {b.shape}, expected {(k // 16, 8 * n)}")
    words = b.view("<u4").astype(np.uint32)  # [K/16, 2N]
    col, fields = marlin_index(n, k)
    kt = np.arange(k // 16)[:, None, None] + 0 * col
    w = words[kt, col]
    u = np.empty((n, k), dtype=np.uint8)
    for i, (ni, ki) in enumerate(fields):
        u[ni, ki] = (w >> np.uint32(4 * i)) & 0xF
    return u


def marlin_scale_perm(groups: int, n: int) -> np.ndarray:
    """Source index (into S^T [K/G, N] flattened row-major) of each stored scale (contract §15.4 step 3)."""
    size = groups * n
    pos = np.arange(size)
    if groups > 1:  # in each 64-chunk, position 8a + b takes source a + 8b
        if size % 64:
            raise ValueError(f"Marlin scales: {size} entries is not a multiple of 64")
        j = pos % 64
        return pos - j + (j // 8) + 8 * (j % 8)
    if size % 32:
        raise ValueError(f"Marlin scales: {size} entries is not a multiple of 32")
    o = np.array([0, 1, 8, 9, 16, 17, 24, 25])  # per-channel: 32-chunks, position 8a + p takes 2a + o[p]
    j = pos % 32
    return pos - j + 2 * (j // 8) + o[j % 8]


def unpack_marlin_scales(scales: np.ndarray, groups: int, n: int) -> np.ndarray:
    """Stored fp16 [K/G, N] (one expert) -> the plain S^T [K/G, N] (scales[g, n] of group g, output n)."""
    s = np.asarray(scales, dtype=np.float16)
    if s.shape != (groups, n):
        raise ValueError(f"Marlin scales have shape {s.shape}, expected {(groups, n)}")
    out = np.empty(groups * n, dtype=np.float16)
    out[marlin_scale_perm(groups, n)] = s.reshape(-1)
    return out.reshape(groups, n)


def dequantize_marlin(qweight: np.ndarray, scales: np.ndarray, n: int, k: int) -> np.ndarray:
    """One expert's Marlin bytes and stored scales -> w [N, K] fp16 = (U - 8) * s[k // G, n], rounded to fp16."""
    groups = np.asarray(scales).shape[0]
    if groups <= 0 or k % groups:
        raise ValueError(f"Marlin scales have {groups} groups, which does not divide K = {k}")
    u = unpack_marlin(qweight, n, k)
    s = unpack_marlin_scales(scales, groups, n)
    per_k = np.repeat(s.astype(np.float32), k // groups, axis=0).T  # [N, K]
    return ((u.astype(np.float32) - 8.0) * per_k).astype(np.float16)


# ------------------------------------------------------------------ the plugins

def _check(name: str, attrs: dict, hidden_states, rank: int | None = None) -> tuple[int, int, int, int]:
    e, k, h, i = (int(attrs[a]) for a in ("num_experts", "top_k", "hidden_size", "moe_inter_size"))
    x = np.asarray(hidden_states)
    if x.shape[-1] != h:
        raise ValueError(f"{name}: hidden_states {x.shape} vs hidden_size {h}")
    if not 1 <= k <= e:
        raise ValueError(f"{name}: top_k {k} with {e} experts")
    return e, k, h, i


def fp16_moe_plugin(router_logits, hidden_states, fc1_weights, fc2_weights, e_score_correction_bias=None,
                    **attrs) -> np.ndarray:
    """``Fp16MoePlugin``: attributes num_experts, top_k, hidden_size, moe_inter_size, activation_type (2),
    norm_topk_prob (0/1), max_routed_rows; routing_mode 0 (softmax top-k) only."""
    e, k, h, i = _check("Fp16MoePlugin", attrs, hidden_states)
    # the runtime's validateAttributes (R0.10 fp16MoePlugin.cpp): anything else fails the engine build
    if e not in FP16_EXPERTS or k > 8 or h % 128 or i % 64:
        raise ValueError(f"Fp16MoePlugin: num_experts {e} (must be one of {FP16_EXPERTS}), top_k {k} (<= 8), "
                         f"hidden_size {h} (multiple of 128), moe_inter_size {i} (multiple of 64)")
    if int(attrs.get("activation_type", FP16_SWIGLU)) != FP16_SWIGLU:
        raise NotImplementedError(f"Fp16MoePlugin reference models activation_type 2 (SwiGLU) only, "
                                  f"got {attrs.get('activation_type')}")
    if int(attrs.get("routing_mode", 0)) != 0 or e_score_correction_bias is not None:
        raise NotImplementedError("Fp16MoePlugin reference models routing_mode 0 (softmax top-k) only")
    if float(attrs.get("routed_scaling_factor", 1.0)) != 1.0:
        raise NotImplementedError("Fp16MoePlugin reference does not model routed_scaling_factor != 1")
    fc1 = np.asarray(fc1_weights, dtype=np.float16)
    fc2 = np.asarray(fc2_weights, dtype=np.float16)
    if fc1.shape != (e, 2 * i, h) or fc2.shape != (e, h, i):
        raise ValueError(f"Fp16MoePlugin: fc1 {fc1.shape} / fc2 {fc2.shape}, expected {(e, 2 * i, h)} / {(e, h, i)}")
    gate, up = fp16_fc1_split(fc1, i)
    return moe(router_logits, hidden_states, gate, up, fc2, top_k=k,
               renormalize=bool(int(attrs.get("norm_topk_prob", 1))))


def int4_moe_plugin(router_logits, hidden_states, fc_gate_up_qweights, fc_gate_up_scales, fc_down_qweights,
                    fc_down_scales, **attrs) -> np.ndarray:
    """``Int4MoePlugin``: Marlin experts, attributes num_experts, top_k, hidden_size, moe_inter_size,
    activation_type (0), quantization_group_size; always renormalizes."""
    e, k, h, i = _check("Int4MoePlugin", attrs, hidden_states)
    g = int(attrs["quantization_group_size"])
    # Marlin tile configs: H % 128, I % 64; group sizes 32 / 64 / 128 or one group over K (per-channel)
    for kk in (h, i):
        if not (g in (32, 64, 128) and kk % g == 0) and g != kk:
            raise ValueError(f"Int4MoePlugin: quantization_group_size {g} does not fit K = {kk}")
    if h % 128 or i % 64:
        raise ValueError(f"Int4MoePlugin: hidden_size {h} (multiple of 128), moe_inter_size {i} (multiple of 64)")
    if int(attrs.get("activation_type", INT4_SWIGLU)) != INT4_SWIGLU:
        raise NotImplementedError(f"Int4MoePlugin reference models activation_type 0 (SwiGLU) only, "
                                  f"got {attrs.get('activation_type')}")
    gu_q, gu_s = np.asarray(fc_gate_up_qweights), np.asarray(fc_gate_up_scales)
    dn_q, dn_s = np.asarray(fc_down_qweights), np.asarray(fc_down_scales)
    want = {"fc_gate_up_qweights": (gu_q.shape, (e, h // 16, 16 * i)),
            "fc_gate_up_scales": (gu_s.shape, (e, h // g, 2 * i)),
            "fc_down_qweights": (dn_q.shape, (e, i // 16, 8 * h)),
            "fc_down_scales": (dn_s.shape, (e, i // g, h))}
    for name, (got, exp) in want.items():
        if tuple(got) != exp:
            raise ValueError(f"Int4MoePlugin: {name} has shape {tuple(got)}, expected {exp}")
    key = hashlib.sha1(b"".join(np.ascontiguousarray(a).tobytes() for a in (gu_q, gu_s, dn_q, dn_s))).digest()
    if key not in _DEQUANTIZED:  # a verify run calls each layer's plugin once per step with the same weights
        fc1 = np.stack([dequantize_marlin(gu_q[x], gu_s[x], 2 * i, h) for x in range(e)])  # [E, 2I, H]
        fc2 = np.stack([dequantize_marlin(dn_q[x], dn_s[x], h, i) for x in range(e)])  # [E, H, I]
        if sum(a.nbytes + b.nbytes for a, b in _DEQUANTIZED.values()) + fc1.nbytes + fc2.nbytes > _CACHE_BYTES:
            _DEQUANTIZED.clear()
        _DEQUANTIZED[key] = (fc1, fc2)
    fc1, fc2 = _DEQUANTIZED[key]
    gate, up = int4_fc1_split(fc1, i)
    return moe(router_logits, hidden_states, gate, up, fc2, top_k=k, renormalize=True)
