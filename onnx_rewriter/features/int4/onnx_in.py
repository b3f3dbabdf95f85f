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
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnx_rewriter.errors import UnsupportedModel
from onnx_rewriter.features.int4.checkpoint import Linear
from onnx_rewriter.modelio.graph import computed_constant, constant_array, lazy_proto

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
    """MatMulNBits -> MatMul (+ Add for a bias), blocked int4 DequantizeLinear -> MatMul's weight, in place;
    returns {weight constant name: a function reading its codes as a Linear}."""
    codes = {}
    for node in [n for n in graph.nodes if n.op == "MatMulNBits"]:
        name = node.name
        k, n, blk, bits = (int(node.attrs.get(a, 0)) for a in ("K", "N", "block_size", "bits"))
        if bits != 4:
            raise UnsupportedModel(f"MatMulNBits '{name}' has {bits}-bit weights; only 4-bit converts to the "
                                   f"INT4 plugin")
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
                              lambda c=c, dtype=dtype: linear(c, base_dir).dequantized().astype(dtype))
        codes[w.name] = lambda c=c: linear(c, base_dir)
        bias = node.inputs[5] if len(node.inputs) > 5 and node.inputs[5].name else None
        mm_out = out if bias is None else gs.Variable(f"{name}/matmul_out", out.dtype)
        graph.nodes.append(gs.Node("MatMul", name=f"{name}/MatMul", inputs=[a, w], outputs=[mm_out]))
        if bias is not None:
            graph.nodes.append(gs.Node("Add", name=f"{name}/bias", inputs=[mm_out, bias], outputs=[out]))
        node.inputs.clear()
        node.outputs.clear()
    codes.update(_blocked_dq(graph, base_dir))
    if codes:
        graph.cleanup().toposort()
    return codes



_INT4 = {onnx.TensorProto.INT4: 8, onnx.TensorProto.UINT4: 0}  # added to a code to make it 0..15


def _blocked_dq(graph: gs.Graph, base_dir) -> dict:
    """DequantizeLinear(int4/uint4 [K, N], scales [K/blk, N], zero points, axis=0, block_size) feeding a MatMul's
    weight input -> that weight as a computed constant; the codes are kept."""
    codes = {}
    for node in [n for n in graph.nodes if n.op == "DequantizeLinear" and n.attrs.get("block_size")]:
        src = node.inputs[0]
        proto = lazy_proto(src) if isinstance(src, gs.Constant) else None
        users = node.outputs[0].outputs
        if proto is None or proto.data_type not in _INT4 or len(proto.dims) != 2 \
                or any(u.op != "MatMul" or u.inputs[1] is not node.outputs[0] for u in users):
            continue
        blk, axis = int(node.attrs["block_size"]), int(node.attrs.get("axis", 1))
        if axis != 0 or blk != GROUP:
            raise UnsupportedModel(f"DequantizeLinear '{node.name}': blocks of {blk} along axis {axis}; the INT4 "
                                   f"plugin takes groups of {GROUP} input channels (axis 0 of the MatMul weight)")
        if not all(isinstance(t, gs.Constant) for t in node.inputs[1:] if t.name):
            raise UnsupportedModel(f"DequantizeLinear '{node.name}': scales and zero points must be initializers")
        k, n = (int(d) for d in proto.dims)
        scale = node.inputs[1]
        zp = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None

        def read(proto=proto, scale=scale, zp=zp, k=k):
            shift = _INT4[proto.data_type]
            q = numpy_helper.to_array(proto, str(base_dir)).astype(np.int16) + shift
            z = (numpy_helper.to_array(lazy_proto(zp) or _inline(zp), str(base_dir)).astype(np.int16) + shift
                 if zp is not None else np.full((k // GROUP, q.shape[1]), shift, np.int16))
            s = np.asarray(constant_array(scale, base_dir), dtype=np.float16)
            return Linear(q=q, z=z, scales=s, g_idx=np.arange(k) // GROUP, group=GROUP)

        dtype = np.dtype(np.float32 if scale.dtype is None else scale.dtype)
        w = computed_constant(f"{node.name}/weight", dtype, (k, n),
                              lambda read=read, dtype=dtype: read().dequantized().astype(dtype))
        for user in users:
            user.inputs[1] = w
        node.outputs.clear()
        codes[w.name] = read
    return codes


def _inline(c: gs.Constant) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(c.values), c.name)
