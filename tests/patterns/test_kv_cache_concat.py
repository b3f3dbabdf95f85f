"""kv_cache_concat: present = Concat(past_key_values input, new, axis=-2), a graph output."""

from __future__ import annotations

from tests.patterns.graphs import HKV, Builder, D, node, reasons, result, run


def _cache(axis=-2, shape=("B", HKV, "T", D)):
    b = Builder()
    past = b.input("past_key_values.0.key", ["B", HKV, "P", D])
    new = b.input("k", ["B", HKV, "S", D])
    present = b.op("Concat", past, new, axis=axis, shape=list(shape))
    return b, past, new, present


def _rejected(b, present, *outputs):
    return reasons(run(b.graph(*outputs)), "kv_cache", node(present))


def test_matches():
    b, past, new, present = _cache()
    m = result(run(b.graph(present)), "kv_cache", node(present))
    assert (m.past, m.new, m.present) == (past, new, present)


def test_looks_through_one_input_concat_on_past():
    b, past, new, present = _cache()
    node(present).inputs[0] = b.op("Concat", past, axis=-2)
    assert result(run(b.graph(present)), "kv_cache", node(present)).past is past


def test_not_two_way():
    b, past, new, present = _cache()
    node(present).inputs.append(new)
    assert _rejected(b, present, present) == ["kv_cache_concat: kv cache: not a 2-way Concat"]


def test_not_on_the_sequence_axis():
    b, past, new, present = _cache(axis=-1)
    assert _rejected(b, present, present) == [
        "kv_cache_concat: kv cache: Concat is not on the sequence axis of a [B, H, T, D] tensor"]


def test_not_rank_4():
    b, past, new, present = _cache(shape=("B", "T", D))
    assert _rejected(b, present, present) == [
        "kv_cache_concat: kv cache: Concat is not on the sequence axis of a [B, H, T, D] tensor"]


def test_past_not_a_graph_input():
    b, past, new, present = _cache()
    node(present).inputs[0] = b.op("Neg", past)
    assert _rejected(b, present, present) == [
        "kv_cache_concat: kv cache: first part is not a graph input (past_key_values)"]


def test_present_not_a_graph_output():
    b, past, new, present = _cache()
    y = b.op("Neg", present)
    assert _rejected(b, present, y) == ["kv_cache_concat: kv cache: result is not a graph output (present)"]
