"""INT4 checkpoints (AutoAWQ GEMM packing, GPTQ): their codes, their dequantized weights, and the plugin's U.

`make export` traces the model with the checkpoint's own dequantized weights (w = (q - z) * s, in fp16) and
the INT4 feature then writes the checkpoint's own codes and scales into the plugin, never re-quantizing.

The plugin has no zero point: it computes (U - 8) * s. Where q - z + 8 fits a nibble for every weight
of a linear, U = q - z + 8 is exact. Where some would clip (asymmetric checkpoints), the linear uses
U = q and adds the constant part outside the plugin: (q - z) * s = (q - 8) * s + (8 - z) * s, the second
term fixed per (group, output column), so y += groupsum(x) @ C with C[g, n] = (8 - z[g, n]) * s[g, n].

Formats (docs/architecture.md, "INT4 checkpoints"):
- AWQ: qweight int32 [K, N/8], nibble j of column c = output channel 8c + AWQ_ORDER[j]; qzeros likewise
  [K/G, N/8]; scales fp16 [K/G, N].
- GPTQ: qweight int32 [K/8, N], nibble j of row r = input channel 8r + j; qzeros int32 [K/G, N/8],
  nibble j of column c = output channel 8c + j, stored as zero - 1 unless symmetric with every stored
  zero 8; scales fp16 [K/G, N]; optional g_idx [K] (act-order: the group of each input channel).
- ModelOpt W4A16_AWQ (quant_method "modelopt", quant_algo W4A16 + AWQ): weight uint8 [N/2, K], low nibble
  row 2i, high nibble row 2i + 1, two's complement q in [-8, 7]; weight_scale fp32 [N, K/G]; optional
  pre_quant_scale fp16 [K], which the graph applies as Mul(x, pre_quant_scale) before the plugin. U = q + 8
  (exact: symmetric), plugin scales = weight_scale^T in fp16. The traced weight is dequant * pre_quant_scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnx_rewriter.errors import RewriteError
from onnx_rewriter.modelio.config_file import read_config
from onnx_rewriter.modelio.safetensors_header import TensorIndex

AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # nibble slot j holds channel 8c + AWQ_ORDER[j]
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
MODELOPT_SUFFIXES = ("weight", "weight_scale", "pre_quant_scale")


def quantization(config) -> dict | None:
    """The checkpoint's quantization_config when it is one we read (AWQ GEMM or GPTQ, 4 bits), else None;
    any other quantization is refused."""
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = str(qc.get("quant_method", "")).lower()
    if method == "modelopt":
        algo = str(qc.get("quant_algo", "")).upper()
        if "W4A16" not in algo or "AWQ" not in algo:
            raise RewriteError(f"ModelOpt checkpoint with quant_algo '{algo}' is not supported; onnx_rewriter "
                               f"reads ModelOpt W4A16_AWQ, AutoAWQ (GEMM) and GPTQ INT4 checkpoints")
        return qc
    if method not in ("awq", "gptq"):
        raise RewriteError(f"quantized checkpoint ({method or 'unknown method'}) is not supported; "
                           f"onnx_rewriter reads AutoAWQ (GEMM), GPTQ and ModelOpt W4A16_AWQ INT4 checkpoints")
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4 or (method == "awq" and version != "gemm"):
        raise RewriteError(f"{method} checkpoint with {bits} bits, packing '{version}': only 4-bit "
                           f"{'GEMM packing' if method == 'awq' else 'weights'} are supported")
    return qc


def _nibbles(words: np.ndarray, axis: int) -> np.ndarray:
    """int32 words -> 8 nibbles each along `axis` (nibble j = bits 4j..4j+3)."""
    w = np.asarray(words).astype(np.uint32)
    nib = (w[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF  # [..., 8]
    nib = np.moveaxis(nib, -1, axis + 1) if axis != w.ndim - 1 else nib
    shape = list(w.shape)
    shape[axis] *= 8
    return nib.reshape(shape).astype(np.int16)


@dataclass
class Linear:
    """One quantized linear's codes: q [K, N], z [K/G, N] (actual zeros), scales fp16 [K/G, N], g_idx [K]."""

    q: np.ndarray
    z: np.ndarray
    scales: np.ndarray
    g_idx: np.ndarray
    group: int

    @property
    def shape_kn(self) -> tuple[int, int]:
        return self.q.shape

    def dequantized(self) -> np.ndarray:
        """w [K, N] fp16: (q - z[g_idx[k]]) * s[g_idx[k]], rounded once (what the checkpoint means)."""
        g = self.g_idx
        return ((self.q - self.z[g]).astype(np.float32) * self.scales[g].astype(np.float32)).astype(np.float16)

    def act_order(self) -> np.ndarray | None:
        """The input permutation that makes groups contiguous (None when it is the identity)."""
        perm = np.argsort(self.g_idx, kind="stable")
        if np.array_equal(perm, np.arange(len(perm))):
            return None
        counts = np.bincount(self.g_idx, minlength=self.scales.shape[0])
        if np.any(counts != self.group):
            raise RewriteError(f"act-order g_idx puts {counts.min()}..{counts.max()} channels in a group, "
                               f"not {self.group}: the scale rows would not line up")
        return perm

    def plugin(self):
        """(U [N, K] for the plugin, in gathered order, correction C [K/G, N] fp16 or None, perm or None)."""
        perm = self.act_order()
        order = perm if perm is not None else np.arange(self.q.shape[0])
        q, zk = self.q[order], self.z[self.g_idx[order]]  # now group k // G, as the plugin reads the scales
        u = q - zk + 8
        if u.min() >= 0 and u.max() <= 15:
            return u.T.astype(np.uint8), None, perm
        corr = ((8 - self.z).astype(np.float32) * self.scales.astype(np.float32)).astype(np.float16)
        return q.T.astype(np.uint8), corr, perm


@dataclass
class ModelOptLinear:
    """A ModelOpt W4A16_AWQ linear: U [N, K] (q + 8), scales fp16 [K/G, N], pre_quant_scale fp16 [K] or None."""

    u: np.ndarray
    scales: np.ndarray
    pre_quant_scale: np.ndarray | None
    group: int

    def dequantized(self) -> np.ndarray:
        """The traced weight [K, N] fp16: the plugin's (U - 8) * s, times pre_quant_scale per input channel."""
        per_k = np.repeat(self.scales.astype(np.float32), self.group, axis=0)  # [K, N]
        w = ((self.u.T.astype(np.float32) - 8) * per_k).astype(np.float16)
        if self.pre_quant_scale is None:
            return w
        return (w.astype(np.float32) * self.pre_quant_scale.astype(np.float32)[:, None]).astype(np.float16)

    def plugin(self):
        return self.u, None, None


def read_modelopt(qc: dict, tensors: dict) -> ModelOptLinear:
    group = int(qc.get("group_size", 128))
    packed = np.asarray(tensors["weight"], dtype=np.uint8)  # [N/2, K]
    lo, hi = packed & 0xF, packed >> 4
    nib = np.stack([lo, hi], axis=1).reshape(-1, packed.shape[1])  # row 2i low, 2i + 1 high
    u = ((nib.astype(np.int16) + 8) % 16).astype(np.uint8)  # two's complement q -> q + 8
    scales = np.asarray(tensors["weight_scale"], dtype=np.float32).T.astype(np.float16)
    if scales.shape != (u.shape[1] // group, u.shape[0]):
        raise RewriteError(f"ModelOpt weight_scale {tuple(scales.shape[::-1])} does not fit weight "
                           f"{tuple(packed.shape)} with group size {group}")
    pqs = tensors.get("pre_quant_scale")
    return ModelOptLinear(u, scales, None if pqs is None else np.asarray(pqs, np.float16).reshape(-1), group)


def read(qc: dict, tensors: dict) -> Linear:
    """Decode one linear from its tensors (numpy arrays keyed by suffix)."""
    method = qc["quant_method"].lower()
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    scales = np.asarray(tensors["scales"], dtype=np.float16)
    n = scales.shape[1]
    if method == "awq":
        q = _nibbles(tensors["qweight"], 1)  # [K, N] in slot order
        inv = np.argsort(np.tile(AWQ_ORDER, n // 8) + np.repeat(np.arange(0, n, 8), 8))
        q = q[:, inv]
        z = _nibbles(tensors["qzeros"], 1)[:, inv]
    else:
        q = _nibbles(tensors["qweight"], 0)  # [K, N]
        qz = tensors.get("qzeros")
        if qz is None or qz.size == 0:  # empty qzeros: symmetric
            z = np.full(scales.shape, 8, dtype=np.int16)
        else:
            z = _nibbles(qz, 1)
            offset = 0 if qc.get("sym", False) and np.all(z == 8) else 1
            z = z + offset
    k = q.shape[0]
    g_idx = tensors.get("g_idx")
    g_idx = np.arange(k) // group if g_idx is None else np.asarray(g_idx, dtype=np.int64)
    return Linear(q=q, z=z, scales=scales, g_idx=g_idx, group=group)


# safetensors dtypes read as plain little-endian numpy arrays (Checkpoint.tensor)
_SAFETENSORS_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                   "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class Checkpoint:
    """The quantized linears of a local checkpoint folder, read lazily from its safetensors."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.qc = quantization(read_config(self.folder / "config.json"))
        self._index = TensorIndex(self.folder)
        self._where = self._index.entries
        self.modelopt = str(self.qc.get("quant_method", "")).lower() == "modelopt"
        marker = ".weight_scale" if self.modelopt else ".qweight"
        self.prefixes = sorted(k[: -len(marker)] for k in self._where if k.endswith(marker))

    def tensor(self, key: str) -> np.ndarray:
        """One tensor, read straight from its file's bytes (TensorIndex: each header parsed once; safe_open parsing
        an MoE checkpoint's thousands of entries per tensor took 32 of a 55 s tiny export)."""
        from safetensors import safe_open

        e = self._where[key]
        dtype = _SAFETENSORS_NP.get(e.dtype)
        if dtype is None:  # bf16, fp8 and the like: the library's own conversion
            with safe_open(str(e.file), "np") as fh:
                return fh.get_tensor(key)
        if e.length != int(np.prod(e.shape)) * np.dtype(dtype).itemsize:
            raise RewriteError(f"{e.file.name}: tensor '{key}' holds {e.length} bytes, not {e.shape} of {e.dtype}")
        try:
            return self._index.raw(key).view(dtype).reshape(e.shape)
        except OSError as exc:
            raise RewriteError(str(exc)) from None

    def linear(self, prefix: str) -> Linear | ModelOptLinear:
        suffixes = MODELOPT_SUFFIXES if self.modelopt else SUFFIXES
        tensors = {s: self.tensor(f"{prefix}.{s}") for s in suffixes if f"{prefix}.{s}" in self._where}
        return (read_modelopt if self.modelopt else read)(self.qc, tensors)

    def plain(self) -> dict:
        """Every tensor that is not part of a quantized linear (ModelOpt's activation amax/scales included)."""
        if self.modelopt:
            own = tuple(f"{p}." for p in self.prefixes)
            return {k: self.tensor(k) for k in self._where if not (k.startswith(own) and not k.endswith(".bias"))}
        parts = {f"{p}.{s}" for p in self.prefixes for s in SUFFIXES}
        return {k: self.tensor(k) for k in self._where if k not in parts}


