"""mrope_table: the M-RoPE cos/sin table of Qwen2.5-VL (sectioned) and Qwen3-VL (interleaved), read by numbers."""

from __future__ import annotations

import numpy as np

from tests.patterns.graphs import Builder, i64, node, reasons, result, run

HALF = 8
INV = (1.0 / 10000 ** (np.arange(0, 2 * HALF, 2) / (2 * HALF))).astype(np.float32)
SECTIONED = [0, 0, 0, 0, 1, 1, 2, 2]  # [4, 2, 2]
INTERLEAVED = [0, 1, 2, 0, 1, 2, 0, 0]  # [4, 2, 2] interleaved: h at 1, 4; w at 2, 5


def _angles(b, pos_shape=(3, "B", "S")):
    pos = b.input("position_ids", list(pos_shape), np.int64)
    f = b.op("Mul", b.op("Cast", b.op("Unsqueeze", pos, i64(-1)), to=1), INV)
    return pos, b.op("Cos", f), b.op("Sin", f)


def _split_pick(b, trig, sections=(4, 2, 2)):
    """Qwen2.5-VL's export: Split by sections on the last axis, Gather row i % 3 of each, Concat, Concat(m, m)."""
    parts = b.op("Split", trig, i64(*sections), axis=3, n_out=3)
    picked = [b.op("Gather", p, i64(k % 3), axis=0) for k, p in enumerate(parts)]
    m = b.op("Concat", *picked, axis=-1)
    return b.op("Concat", m, m, axis=-1)


def _per_freq_pick(b, trig, axes, order=None):
    """One Slice per frequency of the row the pick names (any exporter's data movement), Concat(m, m)."""
    order = list(range(HALF)) if order is None else order
    cols = [b.op("Slice", b.op("Gather", trig, i64(axes[i]), axis=0), i64(i), i64(i + 1), i64(-1)) for i in order]
    m = b.op("Concat", *cols, axis=-1)
    return b.op("Concat", m, m, axis=-1)


def _graph(pick_cos, pick_sin=None, pos_shape=(3, "B", "S")):
    b = Builder()
    pos, cos, sin = _angles(b, pos_shape)
    c = pick_cos(b, cos)
    s = (pick_sin or pick_cos)(b, sin)
    return b, pos, c, s


def _table(b, c, s):
    return result(run(b.graph(c, s)), "rope_table", node(c))


def _why(b, c, s):
    return [r for r in reasons(run(b.graph(c, s)), "rope_table", node(c)) if r.startswith("mrope_table")]


def test_sectioned_split_gather():
    b, pos, c, s = _graph(_split_pick)
    t = _table(b, c, s)
    assert (t.mrope_section, t.mrope_interleaved) == ([4, 2, 2], False)
    assert t.positions is pos and t.cos is c and t.sin is s
    np.testing.assert_array_equal(t.inv_freq, INV.astype(np.float64))


def test_interleaved():
    b, pos, c, s = _graph(lambda b, x: _per_freq_pick(b, x, INTERLEAVED))
    t = _table(b, c, s)
    assert (t.mrope_section, t.mrope_interleaved) == ([4, 2, 2], True)


def test_sectioned_per_frequency_form():
    b, pos, c, s = _graph(lambda b, x: _per_freq_pick(b, x, SECTIONED))
    assert _table(b, c, s).mrope_section == [4, 2, 2]


def test_concat_is_not_m_m():
    b, pos, c, s = _graph(_split_pick)
    node(c).inputs[1] = b.const(np.zeros((1, 1, HALF), np.float32))
    assert _why(b, c, s) == ["mrope_table: m-rope table: Concat is not (m, m)"]


def test_frequencies_reordered():
    order = [1, 0] + list(range(2, HALF))
    b, pos, c, s = _graph(lambda b, x: _per_freq_pick(b, x, [0] * HALF, order=order))
    assert _why(b, c, s) == ["mrope_table: m-rope table: frequencies are reordered"]


def test_pick_neither_layout():
    axes = [1, 0, 0, 0, 0, 0, 2, 2]
    b, pos, c, s = _graph(lambda b, x: _per_freq_pick(b, x, axes))
    assert _why(b, c, s) == [f"mrope_table: m-rope table: row pick {axes} is neither sectioned nor "
                             f"Qwen3-VL-interleaved"]


def test_all_temporal_is_plain_rope():
    b, pos, c, s = _graph(lambda b, x: _per_freq_pick(b, x, [0] * HALF))
    assert _why(b, c, s) == ["mrope_table: m-rope table: every frequency reads the t row (plain RoPE)"]


def test_sin_picks_differently():
    b, pos, c, s = _graph(_split_pick, lambda b, x: _per_freq_pick(b, x, INTERLEAVED))
    assert _why(b, c, s) == ["mrope_table: m-rope table: sin picks its rows differently from cos"]


def test_positions_not_three_rows():
    b, pos, c, s = _graph(_split_pick, pos_shape=("B", "S"))
    assert _why(b, c, s) == ["mrope_table: m-rope table: positions are not a [3, B, S] graph input"]


def test_float_math_between_cos_and_table():
    def scaled(b, x):
        return _split_pick(b, b.op("Exp", x))

    b, pos, c, s = _graph(scaled)
    assert _why(b, c, s) == ["mrope_table: m-rope table: Exp between the Cos/Sin and the table"]
