"""q, k and v projections as one MatMul, and the flat tensors the targets feed the plugin from.

Runs in step_build before the dtype pass, while the graph still carries inferred shapes:

- `fuse_qkv`: `MatMul(x, Wq)`, `MatMul(x, Wk)`, `MatMul(x, Wv)` (+ `Add(b)` each) of a layer become
  `MatMul(x, [Wq|Wk|Wv])` (+ `Add([bq|bk|bv])`) and a `Split` into the three parts. Exact: each output
  column is the same dot product as before. The fused weight is declared as its sources concatenated
  (modelio/stream.py `concatenated`) and streamed when written, one block of rows at a time. A layer left
  apart says why, as a pattern's miss does (the report's `qkv_unfused`).
- `find_views`: the `[B, S, H·D]` tensor each of q, k, v (and the q/k norm inputs) is a pure view of
  (`Reshape` to `[B, S, H, D]`, then `Transpose(0, 2, 1, 3)` for the `[B, H, S, D]` layout), checked on
  the inferred shapes. A target feeds the plugin from it instead of emitting the reverse Transpose and
  Reshape; a packed target then finds the three parts of one Split and takes the fused output whole.
  Likewise the `[B, S, Hq·D]` tensor o_proj reads from the attention output: the target reshapes the
  plugin's output into it directly (one Reshape instead of Transpose/Unsqueeze/Reshape).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_rewriter.matching.results import AttentionLayer
from onnx_rewriter.modelio.normalize import replace_uses

from .matching import producer
from .modelio import stream
from .modelio.graph import lazy_constant, lazy_proto

BHSD = [0, 2, 1, 3]


def _projection(t: gs.Tensor):
    """(MatMul, Add or None) computing the flat `t` = x @ W (+ b), W a 2-D constant, b a 1-D one; else None."""
    node = producer(t)
    add = None
    if node is not None and node.op == "Add":
        consts = [i for i in node.inputs if isinstance(i, gs.Constant)]
        others = [i for i in node.inputs if not isinstance(i, gs.Constant)]
        if len(consts) != 1 or len(others) != 1 or len(consts[0].shape) != 1:
            return None
        add, node = node, producer(others[0])
        if len(others[0].outputs) != 1:
            return None
    if node is None or node.op != "MatMul" or not isinstance(node.inputs[1], gs.Constant):
        return None
    w = node.inputs[1]
    if len(w.shape) != 2 or isinstance(node.inputs[0], gs.Constant):
        return None
    if add is not None and int(add_bias(add).shape[0]) != int(w.shape[1]):
        return None
    return node, add


def add_bias(add: gs.Node) -> gs.Constant:
    return next(i for i in add.inputs if isinstance(i, gs.Constant))


def _viewed(t: gs.Tensor, layout: str) -> gs.Tensor | None:
    """The rank-3 tensor `t` is a view of: t = [Transpose(BHSD)] Reshape(flat) with the same two leading
    dims and H·D = flat's last dim, all read off the inferred shapes; else None."""
    if layout == "bhsd":
        tr = producer(t)
        if tr is None or tr.op != "Transpose" or list(tr.attrs.get("perm", [])) != BHSD:
            return None
        t = tr.inputs[0]
    rs = producer(t)
    if rs is None or rs.op != "Reshape":
        return None
    flat = rs.inputs[0]
    s_in, s_out = flat.shape, rs.outputs[0].shape
    if s_in is None or s_out is None or len(s_in) != 3 or len(s_out) != 4:
        return None
    if any(d is None for d in (*s_in, *s_out)) or list(s_in[:2]) != list(s_out[:2]):
        return None
    if not all(isinstance(d, int) for d in (s_in[2], s_out[2], s_out[3])) or s_in[2] != s_out[2] * s_out[3]:
        return None
    return flat


def _sources(layer: AttentionLayer):
    """(tensor, layout) for q, k, v as the flat projections reach them: before a q/k norm where there is one."""
    out = []
    for t, norm in ((layer.q, layer.q_norm), (layer.k, layer.k_norm), (layer.v, None)):
        if norm is not None and norm.x is not None:
            out.append((norm.x, norm.layout))
        else:
            out.append((t, "bhsd"))
    return out


def find_views(layer: AttentionLayer) -> dict:
    """name of q / k / v / a norm input -> the flat [B, S, H·D] tensor it is a view of."""
    views = {}
    cands = [(layer.q, "bhsd"), (layer.k, "bhsd"), (layer.v, "bhsd")]
    for norm in (layer.q_norm, layer.k_norm):
        if norm is not None and norm.x is not None:
            cands.append((norm.x, norm.layout))
    for t, layout in cands:
        flat = _viewed(t, layout)
        if flat is not None:
            views[t.name] = flat
    flat = _output_view(layer)
    if flat is not None:
        views[layer.out.name] = flat
    return views


def _output_view(layer: AttentionLayer) -> gs.Tensor | None:
    """The [B, S, Hq·D] tensor the attention output ([B, Hq, S, D]) reaches through Transpose(BHSD) and a
    Reshape that only merges the heads (same leading dims on the inferred shapes), each its sole user."""
    out = layer.out
    if len(out.outputs) != 1:
        return None
    tr = out.outputs[0]
    if tr.op != "Transpose" or list(tr.attrs.get("perm", [])) != BHSD or len(tr.outputs[0].outputs) != 1:
        return None
    rs = tr.outputs[0].outputs[0]
    if rs.op != "Reshape" or rs.inputs[0] is not tr.outputs[0]:
        return None
    flat = rs.outputs[0]
    s_in, s_out = out.shape, flat.shape
    if s_in is None or s_out is None or len(s_in) != 4 or len(s_out) != 3 or any(d is None for d in (*s_in, *s_out)):
        return None
    if [s_in[0], s_in[2]] != list(s_out[:2]) or not all(isinstance(d, int) for d in (s_in[1], s_in[3], s_out[2])):
        return None
    return flat if s_in[1] * s_in[3] == s_out[2] else None


def _proto(c: gs.Constant, want: int):
    """A loaded constant as a TensorProto of the stored type `want` of its siblings: a bf16 checkpoint's small
    weights were widened to fp32 on load (exactly, which is checked) and go back to bf16 bits."""
    from onnx import TensorProto, numpy_helper

    arr = np.ascontiguousarray(np.asarray(c.values))
    if want == TensorProto.BFLOAT16 and arr.dtype == np.float32:
        bits = arr.view(np.uint32)
        if (bits & 0xFFFF).any():
            return None
        return TensorProto(name=c.name, data_type=want, dims=arr.shape,
                           raw_data=(bits >> 16).astype(np.uint16).tobytes())
    return numpy_helper.from_array(arr, c.name)


def _concat_constant(name: str, parts: list[gs.Constant]) -> gs.Constant | None:
    """The constants concatenated on the last axis: in memory when all are small arrays, else declared
    and streamed at write time. None when their stored types differ."""
    protos = [lazy_proto(c) for c in parts]
    if all(p is None for p in protos):
        return gs.Constant(name, np.concatenate([np.asarray(c.values) for c in parts], axis=-1))
    from onnx import TensorProto

    want = next(p.data_type for p in protos if p is not None)
    protos = [p if p is not None else _proto(c, want) for p, c in zip(protos, parts)]
    if any(p is None or p.data_type != want for p in protos):
        return None
    proto = stream.concatenated(name, protos)
    proto.data_location = TensorProto.EXTERNAL  # never read as inline data (matching.const skips it)
    return lazy_constant(name, proto)


def fuse_qkv(graph: gs.Graph, layer: AttentionLayer) -> str | None:
    """One MatMul (+ Add) and a Split for the layer's q, k, v projections. Returns None when fused, else why
    not (graph unchanged): they are not three plain projections of one input, with a bias on all or none."""
    flats = [_viewed(t, layout) for t, layout in _sources(layer)]
    if any(f is None for f in flats):
        missing = [n for n, f in zip("qkv", flats) if f is None]
        return f"{', '.join(missing)}: not a Reshape (and head Transpose) of a flat [B, S, H·D] tensor"
    if len({id(f) for f in flats}) != 3:
        return "q, k and v are not views of three different tensors"
    projs = [_projection(f) for f in flats]
    if any(p is None for p in projs):
        missing = [f"{n} ({_made_by(f)})" for n, f, p in zip("qkv", flats, projs) if p is None]
        return f"{', '.join(missing)}: not MatMul(x, W) (+ Add(b)) with W a 2-D and b a 1-D constant"
    mms = [p[0] for p in projs]
    x = mms[0].inputs[0]
    if any(m.inputs[0] is not x for m in mms):
        return "q, k and v project different inputs"
    if len({int(m.inputs[1].shape[0]) for m in mms}) != 1:
        return "q, k and v weights have different input sizes"
    adds = [p[1] for p in projs]
    if any(a is None for a in adds) != all(a is None for a in adds):
        return "a bias on some of q, k, v but not all"
    if any(len(m.outputs[0].outputs) != 1 for m, a in zip(mms, adds) if a is not None):
        return "a biased projection's MatMul has other readers than its Add"
    stem = f"/model/layers.{layer.index}/self_attn/qkv_proj"
    w = _concat_constant(f"{stem}/weight", [m.inputs[1] for m in mms])
    b = None if adds[0] is None else _concat_constant(f"{stem}/bias", [add_bias(a) for a in adds])
    if w is None:
        return "q, k and v weights are stored in different types"
    if adds[0] is not None and b is None:
        return "q, k and v biases are stored in different types"
    widths = [int(m.inputs[1].shape[1]) for m in mms]
    lead = list(flats[0].shape[:2])
    out = gs.Variable(f"{stem}/MatMul_out", flats[0].dtype, lead + [sum(widths)])
    graph.nodes.append(gs.Node("MatMul", name=f"{stem}/MatMul", inputs=[x, w], outputs=[out]))
    if b is not None:
        biased = gs.Variable(f"{stem}/Add_out", flats[0].dtype, lead + [sum(widths)])
        graph.nodes.append(gs.Node("Add", name=f"{stem}/Add", inputs=[out, b], outputs=[biased]))
        out = biased
    parts = [gs.Variable(f"{stem}/Split_out{i}", f.dtype, list(f.shape)) for i, f in enumerate(flats)]
    split = gs.Constant(f"{stem}/split", np.array(widths, dtype=np.int64))
    graph.nodes.append(gs.Node("Split", name=f"{stem}/Split", inputs=[out, split], outputs=parts, attrs={"axis": -1}))
    for old, new in zip(flats, parts):
        replace_uses(graph, old, new)
    return None


def _made_by(t: gs.Tensor) -> str:
    node = producer(t)
    return "a graph input" if node is None else f"from {node.op} '{node.name}'"


def packed(parts: list[gs.Tensor]) -> gs.Tensor | None:
    """The tensor `parts` were split from, when they are all the outputs of one last-axis Split in order."""
    split = producer(parts[0])
    if split is None or split.op != "Split" or split.attrs.get("axis") not in (-1, 2) or list(split.outputs) != parts:
        return None
    return split.inputs[0]


def prepare(graph: gs.Graph, layers: list[AttentionLayer], fuse: bool) -> dict[int, str]:
    """Fuse q/k/v (when `fuse`) and record each layer's views (`layer.views`). Returns, per layer index, why
    its q/k/v stayed apart (the layers fused are not in it; none are tried without `fuse`)."""
    unfused = {}
    for layer in layers if fuse else ():
        why = fuse_qkv(graph, layer)
        if why is not None:
            unfused[layer.index] = why
    for layer in layers:
        layer.views = find_views(layer)
    return unfused
