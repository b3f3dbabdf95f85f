"""INT4 MoE checkpoints (issue 28): a tiny GPTQ Qwen3-MoE written here (tests/support/quant_packers.py) goes through
`export` with its experts' own codes in Int4MoePlugin, never re-quantized; verify compares with transformers holding
the checkpoint's dequantized weights. Act-order and asymmetric (AutoAWQ) experts are refused, each with its reason.

Dims: H = 256, I = 128 and G = 128, so FC1 (K = H) has two groups and FC2 (K = I) one: both of the plugin's scale
permutations are exercised (contract part 3 §15.4 step 3).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from onnx_rewriter.errors import UnsupportedModel
from onnx_rewriter.features.moe.checkpoint import CheckpointExperts
from tests.support import quant_packers as qp

DIMS = dict(hidden_size=256, moe_intermediate_size=128, head_dim=32)
BLOCK = SimpleNamespace(experts=8, hidden=256, inter=128, top_k=2)


@pytest.fixture(scope="module")
def fp16_moe(models):
    return models.checkpoint("qwen3_moe", **DIMS)


@pytest.fixture(scope="module")
def gptq(fp16_moe, tmp_path_factory):
    return qp.write(fp16_moe, tmp_path_factory.mktemp("moe_gptq") / "ck", "gptq", sym=True)


def _export(ck, out, target, **kw):
    from onnx_rewriter import export
    from onnx_rewriter.verification.llm import verify

    run = export(str(ck), out, target=target, **kw)
    res = verify(out, model=str(ck), quiet=True)
    assert res.passed, res.table()
    return run


@pytest.fixture(scope="module")
def gptq_export(gptq, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_gptq_out") / "out"
    return _export(gptq, out, "edgellm-0.9"), out


def test_gptq_moe_export_verifies_with_the_checkpoint_codes(gptq, gptq_export):
    """edgellm-0.9 ([B, S, H] hidden states): verified, and every expert's Marlin bytes / scales unpack to the
    checkpoint's own q - z + 8 and scales, FC1 rows [gate; up]."""
    import onnx
    from onnx import numpy_helper

    from onnx_rewriter.features.int4.checkpoint import Checkpoint
    from onnx_rewriter.reference.moe import unpack_marlin, unpack_marlin_scales

    run, out = gptq_export
    moe = run.report.features["moe"]
    assert moe["plugin"] == "Int4MoePlugin" and moe["experts_from"] == "gptq checkpoint codes"
    model = onnx.load(out / "model.onnx")
    inits = {i.name: i for i in model.graph.initializer}
    plugins = [n for n in model.graph.node if n.op_type == "Int4MoePlugin"]
    assert len(plugins) == 2
    assert {a.name: a.i for a in plugins[0].attribute}["quantization_group_size"] == 128
    ck = Checkpoint(gptq)
    for layer, node in enumerate(plugins):
        gu_q, gu_s, dn_q, dn_s = (numpy_helper.to_array(inits[t]) for t in node.input[2:])
        for e in (0, 5, 7):
            lin = {p: ck.linear(f"model.layers.{layer}.mlp.experts.{e}.{p}") for p in ("gate_proj", "up_proj",
                                                                                     "down_proj")}
            u = {p: (lin[p].q - lin[p].z[np.arange(lin[p].q.shape[0]) // 128] + 8).T for p in lin}
            assert np.array_equal(unpack_marlin(gu_q[e], 256, 256), np.concatenate([u["gate_proj"], u["up_proj"]]))
            assert np.array_equal(unpack_marlin(dn_q[e], 256, 128), u["down_proj"])
            assert np.array_equal(unpack_marlin_scales(gu_s[e], 2, 256),
                                  np.concatenate([lin["gate_proj"].scales, lin["up_proj"].scales], axis=1))
            assert np.array_equal(unpack_marlin_scales(dn_s[e], 1, 256), lin["down_proj"].scales)


@pytest.mark.slow
def test_gptq_moe_export_verifies_on_011(gptq, tmp_path):
    run = _export(gptq, tmp_path / "out", "edgellm-0.11")
    assert run.report.features["moe"]["experts_from"] == "gptq checkpoint codes"


def test_act_order_and_asymmetric_experts_are_refused(fp16_moe, tmp_path):
    """No export needed: the feature's check reads the checkpoint's experts. Act-order (the plugin takes no input
    permutation) and AutoAWQ's asymmetric zeros (q - z + 8 outside a nibble: NVIDIA would clip) are refused by
    name; so is a block whose experts are not all in the checkpoint."""
    act = CheckpointExperts(qp.write(fp16_moe, tmp_path / "act", "gptq", sym=True, act_order=True))
    with pytest.raises(UnsupportedModel, match=r"layer 0: gptq expert model\.layers\.0\.mlp\.experts\.0\.gate_proj: "
                                               r"act-order g_idx"):
        act.check(0, BLOCK)
    awq = CheckpointExperts(qp.write(fp16_moe, tmp_path / "awq", "awq"))
    with pytest.raises(UnsupportedModel, match=r"awq expert .*outside \[0, 15\].*no zero-point input"):
        awq.check(0, BLOCK)
    with pytest.raises(UnsupportedModel, match=r"not 16 complete gate/up/down linears \(24 of 48"):
        awq.check(0, SimpleNamespace(**{**vars(BLOCK), "experts": 16}))
    with pytest.raises(UnsupportedModel, match=r"group size 128 does not fit K = 64"):
        awq.group(0, SimpleNamespace(**{**vars(BLOCK), "inter": 64}))


def test_codes_that_are_not_the_traced_weights_are_refused(gptq):
    """The write-time check: one traced weight off by one fp16 ulp, and the block is refused, not written."""
    from onnx_rewriter.features.int4.checkpoint import Checkpoint

    ck = Checkpoint(gptq)
    experts = CheckpointExperts(gptq)
    deq = {(e, p): ck.linear(f"model.layers.1.mlp.experts.{e}.{p}").dequantized().T
           for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")}
    gu = np.stack([np.concatenate([deq[(e, "gate_proj")], deq[(e, "up_proj")]]) for e in range(8)])
    dn = np.stack([deq[(e, "down_proj")] for e in range(8)])
    packed = experts.packed(1, BLOCK, 128, gu, dn)
    assert [a.shape for a in packed] == [(8, 16, 2048), (8, 2, 256), (8, 8, 2048), (8, 1, 256)]
    dn[3, 7, 9] = np.nextafter(dn[3, 7, 9], np.float16(np.inf))
    with pytest.raises(UnsupportedModel, match="layer 1: expert 3's down codes in the checkpoint are not the weights"):
        experts.packed(1, BLOCK, 128, gu, dn)


def test_per_expert_linears_are_stacked_as_transformers_holds_them():
    from onnx_rewriter.hf.export import stack_experts

    rng = np.random.default_rng(0)
    state = {f"m.layers.0.mlp.experts.{e}.{p}.weight": rng.standard_normal((4, 2) if p == "down_proj" else (2, 4))
             for e in range(3) for p in ("gate_proj", "up_proj", "down_proj")}
    state["m.layers.0.mlp.gate.weight"] = np.zeros((3, 4))
    out = stack_experts(state)
    assert sorted(out) == ["m.layers.0.mlp.experts.down_proj", "m.layers.0.mlp.experts.gate_up_proj",
                           "m.layers.0.mlp.gate.weight"]
    assert out["m.layers.0.mlp.experts.gate_up_proj"].shape == (3, 4, 4)
    assert np.array_equal(out["m.layers.0.mlp.experts.gate_up_proj"][2, :2],
                          state["m.layers.0.mlp.experts.2.gate_proj.weight"])  # gate rows first
    down = out["m.layers.0.mlp.experts.down_proj"]
    assert np.array_equal(down[1], state["m.layers.0.mlp.experts.1.down_proj.weight"])
    del state["m.layers.0.mlp.experts.2.up_proj.weight"]  # incomplete: left for the model's load to name
    assert "m.layers.0.mlp.experts.gate_up_proj" not in stack_experts(state)


# ------------------------------------------------------------------ bf16 checkpoints (traced in bf16 by export)


def test_router_behind_a_cast_is_a_router():
    """A bf16 / fp16 export casts the router probabilities to fp32 before the TopK (Softmax -> Cast -> TopK). The
    router was not recognized there, so a bf16 Qwen3-MoE's blocks stayed as exported (GatherND experts, FP16 under
    --quantize int4), with no word said (found on the 30B-A3B-sized bench checkpoint)."""
    import onnx_graphsurgeon as gs

    from onnx_rewriter.analysis.moe import routers

    logits = gs.Variable("logits", np.float16, (4, 8))
    p16, p32 = gs.Variable("p16", np.float16, (4, 8)), gs.Variable("p32", np.float32, (4, 8))
    vals, idx = gs.Variable("vals", np.float32), gs.Variable("idx", np.int64)
    nodes = [gs.Node("Softmax", "sm", {"axis": -1}, [logits], [p16]), gs.Node("Cast", "cast", {"to": 1}, [p16], [p32]),
             gs.Node("TopK", "topk", {"axis": -1}, [p32, gs.Constant("k", np.array([2], np.int64))], [vals, idx])]
    found = routers(gs.Graph(nodes=nodes, inputs=[logits], outputs=[vals, idx]))
    assert [(r.softmax, r.topk, r.experts, r.top_k) for r in found] == [("sm", "topk", 8, 2)]


@pytest.mark.slow  # ~10 s alone: a bf16 checkpoint exported (traced in bf16) with --quantize int4, verified
def test_bf16_moe_checkpoint_export_is_rewritten(models, tmp_path):
    run = _export(models.checkpoint("qwen3_moe", "bfloat16"), tmp_path / "out", "edgellm-0.11", quantize="int4")
    assert run.report.features["moe"]["layers"] == [0, 1]
