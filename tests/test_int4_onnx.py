"""MatMulNBits and blocked-DequantizeLinear graphs (onnxruntime's quantizer) convert to the INT4 plugin without
going back to FP16 and verify against onnxruntime running the quantized graph itself."""

from __future__ import annotations

import shutil

import pytest

from onnx_rewriter.errors import UnsupportedModel
from onnx_rewriter.pipeline import steps as pipeline
from onnx_rewriter.verification.llm import verify

DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8)


def _nbits(models, tmp_path, block_size=128, symmetric=False, qdq=False):
    """MatMulNBits nodes, or with qdq blocked uint4 DequantizeLinear -> MatMul (onnxruntime's quantizer)."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    base = models.baseline("qwen2", **DIMS)
    out = tmp_path / "nbits"
    shutil.copytree(base.parent, out)
    q = MatMulNBitsQuantizer(onnx.load(str(base)), block_size=block_size, is_symmetric=symmetric,
                             quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator)
    q.process()
    q.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=False)
    return out / "model.onnx"


@pytest.mark.parametrize("target,symmetric,qdq", [("edgellm-0.9", False, False), ("edgellm-0.11", True, False),
                                                  ("edgellm-0.11", False, True)])
def test_quantized_onnx_converts_and_verifies(models, tmp_path, target, symmetric, qdq):
    src = _nbits(models, tmp_path, symmetric=symmetric, qdq=qdq)
    run = pipeline.rewrite(src, tmp_path / "out", target=target)  # INT4 is implied by the input
    rep = run.report.features["int4"]
    assert rep["method"] == "onnx"
    assert sum(e["int4"] for e in rep["linears"]) == 14
    # onnxruntime's symmetric codes fit a nibble (no zero-point term); its asymmetric ones do not
    assert {e.get("zero_point_correction") for e in rep["linears"] if e["int4"]} == {not symmetric}
    res = verify(tmp_path / "out", baseline=str(src), quiet=True)
    assert res.passed, res.table()


def test_matmulnbits_block_size_not_128_is_refused(models, tmp_path):
    src = _nbits(models, tmp_path, block_size=32)
    with pytest.raises(UnsupportedModel, match="block size 32; the INT4 plugin has group size 128 only"):
        pipeline.rewrite(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
