"""Per-head q/k RMSNorm: recognized in front of RoPE, moved into the 0.11 plugin, kept in the graph otherwise."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from onnx_rewriter.matching import engine
from onnx_rewriter.patterns.qk_rmsnorm import PATTERN
from onnx_rewriter.verification.llm import verify


def test_gemma3_norm_after_transpose_moves_into_the_plugin(rewritten):
    """Gemma3 normalizes [B, H, S, D] (after the transpose) with gamma 1 + w, and its local layer uses
    a RoPE table config.json does not describe (gathered per token from a baked table)."""
    from safetensors.numpy import load_file

    out, ckpt = rewritten("gemma3", "edgellm-0.11", "float32")
    result = verify(out, model=str(ckpt), steps=3, quiet=True)
    assert result.passed, result.table()
    model = onnx.load(str(out / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = load_file(str(ckpt / "model.safetensors"))
    plugins = [n for n in model.graph.node if n.op_type == "AttentionPlugin"]
    for i, node in enumerate(plugins):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["enable_qk_norm"] == 1 and len(node.input) == 12
        for which, name in zip(("q_norm", "k_norm"), node.input[6:8]):
            want = 1.0 + weights[f"model.layers.{i}.self_attn.{which}.weight"].astype(np.float32)
            np.testing.assert_allclose(inits[name], want, rtol=1e-6)
    producers = {o: n for n in model.graph.node for o in n.output}
    assert plugins[1].input[3] == "rope_rotary_cos_sin"  # the global layer: config.json's table
    local = producers[plugins[0].input[3]]  # the sliding layer: its own table, one row per position
    assert local.op_type == "Squeeze" and producers[local.input[0]].op_type == "Gather"
    assert "positions" in producers[local.input[0]].input


def _rms_graph(op_23: bool):
    x = gs.Variable("x", np.float32, [1, "s", 4, 16])
    gamma = gs.Constant("gamma", np.linspace(0.5, 1.5, 16, dtype=np.float32))
    y = gs.Variable("y", np.float32, [1, "s", 4, 16])
    if op_23:
        node = gs.Node("RMSNormalization", inputs=[x, gamma], outputs=[y], attrs={"axis": -1, "epsilon": 1e-5})
    else:
        node = gs.Node("Mul", inputs=[x, gamma], outputs=[y])  # a gamma Mul without an RMSNorm core
    return gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=23), node


def test_onnx_rmsnormalization_is_a_qk_norm():
    graph, node = _rms_graph(op_23=True)
    out, norm = PATTERN.match(node, engine.Context(graph=graph))
    assert out is node.outputs[0] and norm.x is graph.inputs[0]
    assert norm.eps == pytest.approx(1e-5) and norm.weight.shape == (16,)


def test_gamma_without_rms_core_is_rejected_with_a_reason():
    graph, node = _rms_graph(op_23=False)
    ctx = engine.run(graph, ["rms_norm", "qk_norm"], [PATTERN])
    misses = ctx.anchor_misses("qk_norm", node)
    assert misses and "not an RMSNorm core" in misses[0].reject.reason
