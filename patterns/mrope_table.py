"""M-RoPE cos/sin table (Qwen2.5-VL, Qwen3-VL): Concat(m, m), m picked per frequency from Cos(positions · inv_freq).

positions is the [3, B, S] (t, h, w) input; Cos gives [3, B, S, R/2] and a data-movement subgraph picks,
for each frequency pair i, the row g(i) (Qwen2.5-VL: Split by sections + Gather + Concat; Qwen3-VL: Gather,
strided Slice, ScatterND / ScatterElements). That subgraph is read by numbers, not by its ops: fed with
row·10000 + i it must return frequency i of one row for every i, and the rows must form either
non-interleaved sections (T…T H…H W…W) or Qwen3-VL's interleave (H at i ≡ 1, W at i ≡ 2 mod 3 below
3·sH / 3·sW). The sin side must pick the same way.
"""

import numpy as np

from onnx_rewriter.matching import Reject, RopeTable, check, mrope_axes, producer, run_subgraph, skip

from ._rope_common import angles_mul, positive_inv_freq

# Ops that only move or select values (and the shape arithmetic they need): no float math between Cos
# and the table, so the numeric probe reads the whole story.
MOVES = {"Split", "Gather", "Slice", "Concat", "Transpose", "ScatterND", "ScatterElements", "Unsqueeze", "Squeeze",
         "Reshape", "Expand", "Shape", "Identity", "Cast", "Range", "Equal", "Where", "ConstantOfShape", "Add", "Mul",
         "Sub", "Div"}
ROW = 10000.0


def _source(t, what, at):
    """The single Cos/Sin node the table tensor is moved out of (other leaves are constants)."""
    found, seen, stack = {}, set(), [t]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        n = producer(x)
        if n is None:
            continue
        if n.op in ("Cos", "Sin"):
            found[id(n)] = n
            continue
        check(n.op in MOVES, f"{what}: {n.op} between the Cos/Sin and the table", n)
        stack.extend(n.inputs)
    check(len(found) == 1, f"{what}: built from {len(found)} Cos/Sin nodes, expected one", at)
    return next(iter(found.values()))


def _picks(graph, trig, table_half, half):
    """Row index g(i) per frequency i, read by feeding row·ROW + i (float-exact) into the Cos/Sin output."""
    probe = (np.arange(3, dtype=np.float32)[:, None, None, None] * ROW
             + np.arange(half, dtype=np.float32)[None, None, None, :]) * np.ones((3, 1, 2, 1), np.float32)
    out = np.asarray(run_subgraph(graph, [table_half], [(trig.outputs[0], probe)])[0])
    check(out.shape[-1] == half and out.size % half == 0, f"m-rope table: probe gave shape {out.shape}", trig)
    rows = out.reshape(-1, half)
    check(np.all(rows == rows[0]), "m-rope table: the pick differs between tokens", trig)
    row, freq = np.divmod(rows[0], ROW)
    check(np.array_equal(freq, np.arange(half)), "m-rope table: frequencies are reordered", trig)
    check(set(row.tolist()) <= {0.0, 1.0, 2.0}, "m-rope table: not a pick of the t/h/w rows", trig)
    return row.astype(np.int64)


def sections_of(g: np.ndarray) -> tuple[list[int], bool] | None:
    """([sT, sH, sW], interleaved) whose runtime row pick is g, or None."""
    s_h, s_w = int((g == 1).sum()), int((g == 2).sum())
    sections = [g.size - s_h - s_w, s_h, s_w]
    for interleaved in (False, True):
        if np.array_equal(g, mrope_axes(sections, interleaved, g.size)):
            return sections, interleaved
    return None


class MRopeTable:
    name = "mrope_table"
    stage = "rope_table"
    anchors = ("Concat",)

    def match(self, node, ctx):
        check(len(node.inputs) == 2 and node.inputs[0] is node.inputs[1], "m-rope table: Concat is not (m, m)", node)
        check(node.attrs.get("axis") in (-1, 3, 2), "m-rope table: Concat is not on the last axis", node)
        half_t = node.inputs[0]
        cos = _source(half_t, "m-rope table", node)
        check(cos.op == "Cos", "m-rope table: the cos half comes from a Sin", node)
        inv, positions = angles_mul(cos.inputs[0], cos, "m-rope angles")
        positions = skip(positions, ("Expand", "Cast", "Unsqueeze"))
        shape = positions.shape
        check(positions in ctx.graph.inputs and shape is not None and len(shape) == 3 and shape[0] == 3,
              "m-rope table: positions are not a [3, B, S] graph input", cos)
        inv = positive_inv_freq(inv, cos, "m-rope table")
        sins = [n for n in cos.inputs[0].outputs if n.op == "Sin"]
        check(len(sins) == 1, "m-rope table: no Sin beside the Cos", cos)
        sin_table = self._sin_table(sins[0], node)
        half = inv.size
        g = _picks(ctx.graph, cos, half_t, half)
        check(np.array_equal(g, _picks(ctx.graph, sins[0], producer(sin_table).inputs[0], half)),
              "m-rope table: sin picks its rows differently from cos", node)
        found = sections_of(g)
        if found is None:
            raise Reject(f"m-rope table: row pick {g.tolist()} is neither sectioned nor Qwen3-VL-interleaved", node)
        sections, interleaved = found
        check(sections[1] + sections[2] > 0, "m-rope table: every frequency reads the t row (plain RoPE)", node)
        return node.outputs[0], RopeTable(inv_freq=inv, positions=positions, cos=node.outputs[0], sin=sin_table,
                                          mrope_section=sections, mrope_interleaved=interleaved)

    @staticmethod
    def _sin_table(sin, at):
        """The Concat(m', m') the Sin output is moved into."""
        seen, stack, found = set(), [sin.outputs[0]], []
        while stack:
            t = stack.pop()
            for n in t.outputs:
                if id(n) in seen:
                    continue
                seen.add(id(n))
                if n.op == "Concat" and len(n.inputs) == 2 and n.inputs[0] is n.inputs[1]:
                    found.append(n.outputs[0])
                elif n.op in MOVES:
                    stack.extend(n.outputs)
        check(len(found) == 1, f"m-rope table: the Sin feeds {len(found)} (m, m) Concats, expected one", at)
        return found[0]


PATTERN = MRopeTable()
