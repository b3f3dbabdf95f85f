"""Already-quantized ONNX in: `com.microsoft::MatMulNBits` (onnxruntime's quantizer, the GenAI builder).

Before matching, each 4-bit MatMulNBits becomes MatMul(A, W) with W [K, N] its dequantized weight (computed
only if it is written, e.g. a linear left FP16), so the patterns see a plain export. The codes are kept
(`quantized_checkpoint.Linear`) and the INT4 feature repacks them into the plugin without going through
FP16. MatMulNBits storage: B uint8 [N, K/blk, blk/2], element k of a block in byte k // 2 (even k: low
nibble); scales [N, K/blk] (or flat); zero_points uint8 packed the same way over the blocks (default 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .errors import UnsupportedModel
from .graph import computed_constant, constant_array
from .quantized_checkpoint import Linear

GROUP = 128


def _lo_hi(b: np.ndarray) -> np.ndarray:
    """uint8 [..., m] -> nibbles [..., 2m], low nibble first."""
    b = np.asarray(b, dtype=np.uint8)
    return np.stack([b & 0xF, b >> 4], axis=-1).reshape(b.shape[:-1] + (-1,)).astype(np.int16)


@dataclass
class Codes:
    """A MatMulNBits node's attributes and constant inputs (B, scales, zero_points or None)."""

    name: str
    k: int
    n: int
    block: int
    b: gs.Constant
    scales: gs.Constant
    zero_points: gs.Constant | None


def linear(c: Codes, base_dir) -> Linear:
    """The codes as a Linear: q [K, N], actual zeros and scales [K/blk, N]."""
    k, n, blk = c.k, c.n, c.block
    blocks = -(-k // blk)
    b = constant_array(c.b, base_dir).reshape(n, blocks, -1)
    q = _lo_hi(b).reshape(n, blocks * blk)[:, :k].T  # [K, N]
    scales = np.asarray(constant_array(c.scales, base_dir), dtype=np.float32).reshape(n, blocks)
    zp = c.zero_points
    if zp is None:
        z = np.full((n, blocks), 8, dtype=np.int16)
    else:
        zv = constant_array(zp, base_dir)
        if zv.dtype != np.uint8:
            raise UnsupportedModel(f"MatMulNBits '{c.name}': float zero points are not supported")
        z = _lo_hi(zv.reshape(n, -1))[:, :blocks]
    return Linear(q=q, z=z.T.copy(), scales=scales.T.astype(np.float16), g_idx=np.arange(k) // blk, group=blk)


def convert(graph: gs.Graph, base_dir) -> dict:
    """MatMulNBits -> MatMul (+ Add for a bias) in place; returns {weight constant name: its Codes}."""
    codes = {}
    for node in [n for n in graph.nodes if n.op == "MatMulNBits"]:
        name = node.name
        k, n, blk, bits = (int(node.attrs.get(a, 0)) for a in ("K", "N", "block_size", "bits"))
        if bits != 4:
            raise UnsupportedModel(f"MatMulNBits '{name}' has {bits}-bit weights; only 4-bit converts to the INT4 plugin")
        if blk != GROUP:
            raise UnsupportedModel(f"MatMulNBits '{name}' has block size {blk}; the INT4 plugin has group size "
                                   f"{GROUP} only (re-quantize with block_size={GROUP})")
        if len(node.inputs) > 4 and node.inputs[4].name:
            raise UnsupportedModel(f"MatMulNBits '{name}' has g_idx; not supported")
        if not all(isinstance(t, gs.Constant) for t in node.inputs[1:4] if t.name):
            raise UnsupportedModel(f"MatMulNBits '{name}': weights, scales and zero points must be initializers")
        a, out = node.inputs[0], node.outputs[0]
        dtype = np.dtype(np.float32 if node.inputs[2].dtype is None else node.inputs[2].dtype)
        zp = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
        c = Codes(name, k, n, blk, node.inputs[1], node.inputs[2], zp)
        w = computed_constant(f"{name}/weight", dtype, (k, n),
                              lambda c=c: linear(c, base_dir).dequantized().astype(dtype))
        codes[w.name] = c
        bias = node.inputs[5] if len(node.inputs) > 5 and node.inputs[5].name else None
        mm_out = out if bias is None else gs.Variable(f"{name}/matmul_out", out.dtype)
        graph.nodes.append(gs.Node("MatMul", name=f"{name}/MatMul", inputs=[a, w], outputs=[mm_out]))
        if bias is not None:
            graph.nodes.append(gs.Node("Add", name=f"{name}/bias", inputs=[mm_out, bias], outputs=[out]))
        node.inputs.clear()
        node.outputs.clear()
    if codes:
        graph.cleanup().toposort()
    return codes

