"""AWQ / GPTQ checkpoints through export: traced with their dequantized weights, their own codes in the plugin
(never re-quantized), the zero-point term outside the plugin only where a nibble would clip."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_rewriter.features.int4 import checkpoint as qc
from tests.support import quant_packers as qp

DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8)
FORMATS = {
    "awq": ({"quant_method": "awq"}, lambda w: qp.awq_tensors(w), dict(sym=False)),
    "gptq": ({"quant_method": "gptq"}, lambda w: qp.gptq_tensors(w), dict(sym=False)),
    "gptq_sym": ({"quant_method": "gptq", "sym": True}, lambda w: qp.gptq_tensors(w, sym=True), dict(sym=True)),
    "gptq_act": ({"quant_method": "gptq"}, lambda w: qp.gptq_tensors(w, act_order=True), dict(sym=False)),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_codes_decode_and_plugin_math_is_exact(fmt):
    config, pack, truth_kw = FORMATS[fmt]
    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 192)).astype(np.float32) * 0.1
    lin = qc.read(config, pack(w))
    g_idx = lin.g_idx
    q, z, s = qp.quantize(w, sym=truth_kw["sym"], g_idx=g_idx)  # what the packer stored
    assert np.array_equal(lin.q, q) and np.array_equal(lin.z, z) and np.array_equal(lin.scales, s)
    u, corr, perm = lin.plugin()
    assert (perm is not None) == (fmt == "gptq_act")
    assert (corr is None) == (fmt == "gptq_sym")  # symmetric needs no zero-point term
    # what the graph computes: plugin (U - 8) * s on the gathered input, plus groupsum @ C
    x = rng.standard_normal((3, 256)).astype(np.float32)
    xg = x[:, perm] if perm is not None else x
    w_plugin = ((u.T.astype(np.float32) - 8) * np.repeat(s.astype(np.float32), 128, axis=0))
    y = xg @ w_plugin
    if corr is not None:
        y += xg.reshape(3, 2, 128).sum(-1) @ corr.astype(np.float32)
    np.testing.assert_allclose(y, x @ lin.dequantized().astype(np.float32), rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("fmt", ["awq", "gptq_act"])
def test_written_checkpoint_holds_the_fp16_weights(models, tmp_path, fmt):
    """The files `quant_packers.write` leaves decode to the FP16 model's weights within one quantization step
    (a packer writing a non-contiguous array's buffer once made every AWQ/GPTQ test model noise)."""
    from safetensors.numpy import load_file

    fp16 = models.checkpoint("qwen2", **DIMS)
    ck = qp.write(fp16, tmp_path / "ck", fmt.split("_")[0], **({"act_order": True} if fmt == "gptq_act" else {}))
    state = load_file(str(fp16 / "model.safetensors"))
    checkpoint = qc.Checkpoint(ck)
    assert len(checkpoint.prefixes) == 14
    for p in checkpoint.prefixes:
        lin = checkpoint.linear(p)
        err = np.abs(lin.dequantized().astype(np.float32) - state[f"{p}.weight"].T)
        assert err.max() <= lin.scales.astype(np.float32).max(), p


def test_clip_rule_would_lose_information():
    """NVIDIA's clip(q - z + 8, 0, 15) on an asymmetric checkpoint changes weights; ours does not."""
    lin = qc.read({"quant_method": "awq"}, qp.awq_tensors(np.random.default_rng(2).standard_normal((128, 64))
                                                         .astype(np.float32)))
    clipped = np.clip(lin.q - lin.z + 8, 0, 15)
    assert np.any(clipped != lin.q - lin.z + 8)
    assert lin.plugin()[1] is not None


def _export(models, tmp_path, fmt, target, **kw):
    from onnx_rewriter import export
    from onnx_rewriter.verification.llm import verify

    ck = qp.write(models.checkpoint("qwen2", **DIMS), tmp_path / f"ck_{fmt}", fmt.split("_")[0], **kw)
    run = export(str(ck), tmp_path / "out", target=target)
    res = verify(tmp_path / "out", model=str(ck), quiet=True)
    assert res.passed, res.table()
    assert res.quantization == []  # no FP16 model to compare with: the checkpoint is the model
    return {e["linear"]: e for e in run.report.features["int4"]["linears"] if e["int4"]}


def test_awq_export_verifies(models, tmp_path):
    linears = _export(models, tmp_path, "awq", "edgellm-0.9")
    assert len(linears) == 14 and all(e["op"] == "Int4GroupwiseGemmPlugin" for e in linears.values())
    assert any(e["zero_point_correction"] for e in linears.values())


def test_gptq_act_order_export_verifies(models, tmp_path):
    linears = _export(models, tmp_path, "gptq", "edgellm-0.11", act_order=True)
    assert len(linears) == 14
    # act-order permutes only where K holds more than one group: down_proj (K = 256)
    assert {p for p, e in linears.items() if e["act_order"]} == {
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}


@pytest.mark.slow
@pytest.mark.parametrize("target", ["edgellm-0.5", "edgellm-0.11"])
def test_awq_export_slow(models, tmp_path, target):
    _export(models, tmp_path, "awq", target)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["edgellm-0.5", "edgellm-0.9"])
def test_gptq_sym_act_order_slow(models, tmp_path, target):
    linears = _export(models, tmp_path, "gptq", target, sym=True, act_order=True)
    assert not any(e["zero_point_correction"] for e in linears.values())


def test_modelopt_codes_decode_exactly():
    w = np.random.default_rng(3).standard_normal((256, 64)).astype(np.float32) * 0.1
    t = qp.modelopt_tensors(w)
    lin = qc.read_modelopt({"quant_method": "modelopt", "quant_algo": "W4A16_AWQ"}, t)
    # what the packer meant: q = round((W / pqs) / s) in [-8, 7]; U = q + 8; scales = weight_scale^T
    pqs = t["pre_quant_scale"].astype(np.float32)
    s = t["weight_scale"].astype(np.float16).astype(np.float32)  # [N, K/G]
    q = np.clip(np.rint((w / pqs[:, None]).T.reshape(64, 2, 128) / s[..., None]), -8, 7).reshape(64, 256)
    assert np.array_equal(lin.u.astype(np.int16) - 8, q) and np.array_equal(lin.scales, s.T.astype(np.float16))
    # the traced weight is the plugin's (U - 8) * s seen through x * pqs, and it approximates W
    x = np.random.default_rng(4).standard_normal((3, 256)).astype(np.float32)
    y_graph = (x * pqs) @ ((lin.u.T.astype(np.float32) - 8) * np.repeat(s.T, 128, axis=0))
    np.testing.assert_allclose(y_graph, x @ lin.dequantized().astype(np.float32), rtol=2e-3, atol=2e-3)
    assert np.linalg.norm(lin.dequantized().astype(np.float32) - w) < 0.25 * np.linalg.norm(w)  # measured 0.21


def test_modelopt_w4a16_awq_export_verifies(models, tmp_path):
    linears = _export(models, tmp_path, "modelopt", "edgellm-0.11")
    assert len(linears) == 14 and all(e["pre_quant_scale"] and not e["zero_point_correction"]
                                      for e in linears.values())
