"""The small patterns on real exports: what each matches, and the reason it gives when it does not."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnx_rewriter.matching import engine
from onnx_rewriter.modelio import graph as graphio
from onnx_rewriter.modelio.normalize import normalize
from onnx_rewriter.patterns import STAGES, load_patterns


def _match(path, mutate=None):
    src = graphio.load(path)
    g = normalize(src.graph, reinfer=True)
    if mutate:
        mutate(g)
    return engine.run(g, STAGES, load_patterns())


@pytest.fixture(scope="module")
def llama_sdpa(models):
    return models.baseline("llama")


@pytest.fixture(scope="module")
def llama_eager(models):
    return models.baseline("llama", attn="eager")


@pytest.mark.parametrize("which", ["sdpa", "eager"])
def test_every_stage_matches_per_layer(which, llama_sdpa, llama_eager):
    ctx = _match(llama_sdpa if which == "sdpa" else llama_eager)
    count = {s: len(ctx.matches[s]) for s in STAGES}
    assert count["rope_table"] == 1  # cos/sin computed once, shared by all layers
    assert count["rope"] == 4  # q and k in 2 layers
    assert count["repeat_kv"] == 4  # k and v in 2 layers (4 q heads over 2 kv heads)
    assert count["attention_core"] == 2 and count["attention_layer"] == 2
    assert count["rms_norm"] == 5  # 2 per layer + the final norm
    table = next(iter(ctx.matches["rope_table"].values())).result
    np.testing.assert_allclose(table.inv_freq, 1.0 / 10000 ** (np.arange(0, 16, 2) / 16), rtol=1e-6)
    for m in ctx.matches["attention_core"].values():
        assert m.result.scale == pytest.approx(0.25)  # 1/sqrt(16), split or not
    layer = next(iter(ctx.matches["attention_layer"].values())).result
    assert (layer.num_q_heads, layer.num_kv_heads, layer.head_size, layer.rotary_dim) == (4, 2, 16, 16)


def _first(g, op, pred=lambda n: True):
    return next(n for n in g.nodes if n.op == op and pred(n))


def test_rotate_half_names_the_broken_slice(llama_sdpa):
    def break_bound(g):
        # the lower half of q's rotate_half in layer 0 now ends one dim early
        node = _first(g, "Neg")
        cat = node.outputs[0].outputs[0]
        lo = cat.inputs[1].inputs[0]
        lo.inputs[2] = gs.Constant("bad_end", np.array([7], dtype=np.int64))

    ctx = _match(llama_sdpa, break_bound)
    assert len(ctx.matches["rope"]) == 3
    reasons = [m.describe() for ms in ctx.misses["rope"].values() for m in ms]
    assert any("lower half is [0:7], expected [0:8]" in r for r in reasons)
    layer_misses = [m.describe() for ms in ctx.misses["attention_layer"].values() for m in ms]
    assert len(layer_misses) == 1 and "not roped by a recognized RoPE" in layer_misses[0]


def test_attention_core_refuses_soft_capping(models):
    with pytest.raises(engine.Refuse, match="soft-capping"):
        _match(models.baseline("gemma2", attn="eager"))


def test_repeat_kv_absent_without_gqa(models):
    ctx = _match(models.baseline("llama", num_key_value_heads=4))
    assert len(ctx.matches["repeat_kv"]) == 0
    assert len(ctx.matches["attention_layer"]) == 2
