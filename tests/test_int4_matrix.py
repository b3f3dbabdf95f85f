"""The INT4 matrix of issue 17's "Must show": RTN, AutoAWQ and GPTQ-act-order exports of 2-layer Qwen2- and
Llama-style models on every target pass verify against the dequantized model, with the INT4 error against
the FP16 model reported. Slow (18 exports + verifies); the default suite keeps one row of each kind
(test_int4.py, test_int4_checkpoints.py, test_int4_onnx.py)."""

from __future__ import annotations

import pytest

from onnx_rewriter import export
from onnx_rewriter.pipeline import steps as pipeline
from onnx_rewriter.verification.llm import verify
from tests.support import quant_packers as qp

DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8)
TARGETS = ("edgellm-0.5", "edgellm-0.9", "edgellm-0.10", "edgellm-0.11")


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("method", ["rtn", "awq", "gptq_act_order"])
def test_int4_matrix(models, tmp_path, method, family, target):
    fp16 = models.checkpoint(family, **DIMS)
    out = tmp_path / "out"
    if method == "rtn":
        run = pipeline.rewrite(models.baseline(family, **DIMS), out, target=target, quantize="int4")
        model, original = str(fp16), None
    else:
        fmt = method.split("_")[0]
        ck = qp.write(fp16, tmp_path / "ck", fmt, **({"act_order": True} if fmt == "gptq" else {}))
        run = export(str(ck), out, target=target)
        model, original = str(ck), str(fp16)
    linears = [e for e in run.report.features["int4"]["linears"] if e["int4"]]
    assert len(linears) == 14  # q, k, v, o, gate, up, down x 2 layers; lm_head FP16
    if method == "gptq_act_order":
        assert sum(e["act_order"] for e in linears) == 2  # down_proj: the only K with more than one group
    res = verify(out, model=model, fp16_model=original, steps=4)
    assert res.passed, res.table()
    assert len(res.quantization) == len(res.steps) and min(s.cosine for s in res.quantization) < 0.9999
