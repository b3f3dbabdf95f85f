"""Qwen2-MoE as released (issue 28): 60 experts, top-4, a shared expert behind a sigmoid gate, `norm_topk_prob` false.
No FP16 plugin takes 60 experts: FP16 experts are refused with that reason, unless `--moe-dense` asks for the
plugin-free form (every expert computed, its cost in the report); INT4 experts are one Int4MoePlugin per block times
the top-k mass. One export per row, the checkpoint built once for the module.
"""

from __future__ import annotations

import pytest

from tests.test_errors import assert_no_output, assert_refused, run_cli

E60 = dict(num_experts=60, num_experts_per_tok=4)


@pytest.fixture(scope="module")
def qwen2_moe60(models):
    return models.checkpoint("qwen2_moe", **E60)


def _export(ckpt, out, target, **kw):
    from onnx_rewriter import export
    from onnx_rewriter.verification.llm import verify

    run = export(str(ckpt), out, target=target, **kw)
    res = verify(out, model=str(ckpt), quiet=True)
    return run, res


@pytest.mark.parametrize("target", ["edgellm-0.11", "edgellm-0.9"])
def test_fp16_experts_are_refused_naming_the_expert_count(qwen2_moe60, tmp_path, capsys, target):
    """Before anything is loaded: the config says 60 FP16 experts; the line says what would work."""
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", "--model", qwen2_moe60, "--output-dir", out, "--target", target)
    assert_refused(code, err, "qwen2_moe: 60 experts, top-4", "no MoE plugin takes these FP16 experts",
                   "128 or 256 experts", "--quantize int4", "--moe-dense")
    assert_no_output(out)


def test_moe_dense_writes_the_plugin_free_form_and_verifies(qwen2_moe60, tmp_path):
    """--moe-dense: no MoE plugin, the routed layer as MatMuls over all 60 experts weighted by the scattered top-k
    weights (not renormalized); the shared expert and its gate as exported; the cost (15x) in report and warning."""
    import onnx

    run, res = _export(qwen2_moe60, tmp_path / "out", "edgellm-0.11", moe_dense=True)
    assert res.passed, res.table()
    moe = run.report.features["moe"]
    assert moe["layers"] == [1] and moe["plugin"] == "dense (no MoE plugin)"
    assert moe["dense_cost"]["factor"] == 15.0
    assert moe["dense_cost"]["dense_mflop_per_token"] == pytest.approx(15 * moe["dense_cost"]["plugin_mflop_per_token"],
                                                                       rel=1e-2)
    assert any(w.startswith("--moe-dense:") and "15x" in w for w in run.report.warnings)
    g = onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    assert not [o for o in ops if o.endswith("MoePlugin")] and ops.count("ScatterElements") == 1
    assert "/model/layers.1/mlp/experts/dense_renormalize" not in {n.name for n in g.node}
    dims = {i.name: list(i.dims) for i in g.initializer}
    assert dims["/model/layers.1/mlp/experts.dense_fc1"] == [128, 60 * 128]
    assert dims["/model/layers.1/mlp/experts.dense_fc2"] == [60 * 64, 128]


def test_moe_dense_with_int4_is_refused(tmp_path, capsys):
    base = tmp_path / "model.onnx"  # refused with the options, before the input is read
    base.write_bytes(b"")
    code, _, err = run_cli(capsys, base, tmp_path / "out", "--moe-dense", "--quantize", "int4")
    assert_refused(code, err, "--moe-dense", "--quantize int4", "drop one")
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("target", ["edgellm-0.9", pytest.param("edgellm-0.11", marks=pytest.mark.slow)])
def test_int4_experts_verify(qwen2_moe60, tmp_path, target):
    """--quantize int4: one Int4MoePlugin (60 experts, RTN), its output times the top-k mass; verified against the
    model holding the same dequantized experts."""
    import onnx

    run, res = _export(qwen2_moe60, tmp_path / "out", target, quantize="int4")
    assert res.passed, res.table()
    assert run.report.features["moe"]["plugin"] == "Int4MoePlugin"
    g = onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False).graph
    plugins = [n for n in g.node if n.op_type == "Int4MoePlugin"]
    assert len(plugins) == 1 and {a.name: a.i for a in plugins[0].attribute}["num_experts"] == 60
    assert "/model/layers.1/mlp/experts/Int4MoePlugin_scale" in {n.name for n in g.node}  # the top-k mass


@pytest.mark.slow  # ~10 s alone: export + verify of the tiny Mixtral
def test_mixtral_int4_verifies_with_an_unvalidated_warning(models, tmp_path):
    """Mixtral (contract §15.6: INT4 behind an "unvalidated" warning): 8 experts, top-2, renormalized; its FP16
    experts are refused like any E no FP16 plugin takes (tests/test_moe.py refusal rows)."""
    run, res = _export(models.checkpoint("mixtral"), tmp_path / "out", "edgellm-0.11", quantize="int4")
    assert res.passed, res.table()
    assert run.report.features["moe"]["plugin"] == "Int4MoePlugin"
    assert any(w.startswith("Mixtral: unvalidated on the runtime") for w in run.report.warnings)
