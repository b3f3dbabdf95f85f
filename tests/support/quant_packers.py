"""Tiny AWQ (GEMM), GPTQ and ModelOpt W4A16_AWQ checkpoints written from a tiny FP checkpoint by our packers.

Codes follow each format's storage rules (quantized_checkpoint.py describes them); the test models get
asymmetric zeros, symmetric GPTQ, and act-order with a shuffled g_idx.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from onnx_rewriter.features.int4.checkpoint import AWQ_ORDER

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize(w_kn, group=128, sym=False, g_idx=None):
    """-> q [K, N] in 0..15, z [K/G, N] in 1..15, s fp16 [K/G, N] with w ~ (q - z[g_idx]) * s[g_idx]."""
    k, n = w_kn.shape
    g_idx = np.arange(k) // group if g_idx is None else g_idx
    q = np.zeros((k, n), np.int64)
    z = np.zeros((k // group, n), np.int64)
    s = np.zeros((k // group, n), np.float16)
    for g in range(k // group):
        rows = w_kn[g_idx == g]
        if sym:
            sg = (np.abs(rows).max(0) / 7.5).astype(np.float16)
            zg = np.full(n, 8)
        else:
            lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
            sg = ((hi - lo) / 15).astype(np.float16)
            zg = np.clip(np.rint(-lo / sg.astype(np.float32)), 1, 15).astype(np.int64)
        q[g_idx == g] = np.clip(np.rint(rows / sg.astype(np.float32)) + zg, 0, 15)
        z[g], s[g] = zg, sg
    return q, z, s


def _words(nib, axis):
    """Pack 8 nibbles along `axis` into int32 words (nibble j = bits 4j..4j+3)."""
    nib = np.moveaxis(np.asarray(nib, np.uint32), axis, -1)
    nib = nib.reshape(nib.shape[:-1] + (nib.shape[-1] // 8, 8))
    words = (nib << (4 * np.arange(8, dtype=np.uint32))).sum(-1, dtype=np.uint32)
    # contiguous: safetensors.numpy writes an array's buffer as it lies in memory, strides ignored
    return np.ascontiguousarray(np.moveaxis(words, -1, axis)).view(np.int32)


def awq_tensors(w_kn):
    q, z, s = quantize(w_kn)
    n = q.shape[1]
    slot = np.tile(AWQ_ORDER, n // 8) + np.repeat(np.arange(0, n, 8), 8)  # slot 8c + j holds channel slot[...]
    return {"qweight": _words(q[:, slot], 1), "qzeros": _words(z[:, slot], 1), "scales": s}


def gptq_tensors(w_kn, sym=False, act_order=False, seed=0):
    k = w_kn.shape[0]
    g_idx = np.arange(k) // 128
    if act_order:
        perm = np.random.default_rng(seed).permutation(k)
        g_idx = np.empty(k, np.int64)
        g_idx[perm] = np.arange(k) // 128
    q, z, s = quantize(w_kn, sym=sym, g_idx=g_idx)
    return {"qweight": _words(q, 0), "qzeros": _words(z - 1, 1), "scales": s, "g_idx": g_idx.astype(np.int32)}


def modelopt_tensors(w_kn, pre_quant_scale=True, seed=0):
    """ModelOpt W4A16_AWQ: the weight seen through x * pqs is W / pqs; symmetric q in [-8, 7] per (row n, group),
    weight uint8 [N/2, K] (row 2i low nibble, 2i + 1 high, two's complement), weight_scale fp32 [N, K/G]."""
    k, n = w_kn.shape
    out = {}
    w = np.asarray(w_kn, np.float32)
    if pre_quant_scale:
        pqs = np.random.default_rng(seed).uniform(0.5, 2.0, k).astype(np.float16)
        w = w / pqs.astype(np.float32)[:, None]
        out["pre_quant_scale"] = pqs
    g = w.T.reshape(n, k // 128, 128)  # [N, K/G, G]
    scale = np.abs(g).max(-1) / 7.0  # fp32 [N, K/G]
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(g / scale.astype(np.float16).astype(np.float32)[..., None]), -8, 7).astype(np.int8)
    nib = (q.reshape(n, k).astype(np.int16) & 0xF).astype(np.uint8)
    out["weight"] = np.ascontiguousarray(nib[0::2] | (nib[1::2] << 4))
    out["weight_scale"] = scale.astype(np.float32)
    return out


def write(fp_ckpt, out, method: str, **kw) -> Path:
    """Quantize every decoder projection of `fp_ckpt` into a `method` ("awq" / "gptq") checkpoint at `out`."""
    from safetensors.numpy import load_file, save_file

    out = Path(out)
    shutil.copytree(fp_ckpt, out, dirs_exist_ok=True)
    for f in out.glob("*.safetensors"):
        f.unlink()
    state = {}
    for f in sorted(Path(fp_ckpt).glob("*.safetensors")):
        state.update(load_file(str(f)))
    tensors = {}
    for key, value in state.items():
        prefix = key[: -len(".weight")]
        if key.endswith(".weight") and prefix.rsplit(".", 1)[-1] in PROJ:
            w_kn = value.astype(np.float32).T
            parts = {"awq": awq_tensors, "gptq": gptq_tensors, "modelopt": modelopt_tensors}[method](w_kn, **kw)
            tensors.update({f"{prefix}.{k}": v for k, v in parts.items()})
            if method == "modelopt":  # ModelOpt also stores activation scales; the rewriter must ignore them
                tensors[f"{prefix}.input_scale"] = np.array(1.0, np.float32)
        else:
            tensors[key] = value
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    qc = {"quant_method": method, "bits": 4, "group_size": 128}
    if method == "modelopt":
        qc = {"quant_method": "modelopt", "quant_algo": "W4A16_AWQ", "group_size": 128}
        (out / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": {
            "quant_algo": "W4A16_AWQ", "group_size": 128}}))
    else:
        qc.update({"version": "gemm", "zero_point": True} if method == "awq" else
                  {"sym": kw.get("sym", False), "desc_act": kw.get("act_order", False)})
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
