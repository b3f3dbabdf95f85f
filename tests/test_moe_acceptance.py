"""Issue 28's acceptance matrix on its exact model: a tiny Qwen3-MoE with E = 128 (Fp16MoePlugin's count) and
top-8, exported and verified through the CLI as `make export ... VERIFY=1` runs it. Each row is a full export
plus verify (~5-15 s), so the matrix is slow; the default suite covers each plugin and target with cheaper rows
(test_moe.py, test_moe_checkpoint.py, test_moe_qwen2.py).

The bf16 `--quantize int4` rows on 0.11 of seeds 0 and 2 are the ones that needed verify's routing near-tie
rule (verification/moe_routing.py): without it they fail from the prefill on.
"""

from __future__ import annotations

import onnx
import pytest

from onnx_rewriter import cli
from tests.support import quant_packers as qp

pytestmark = pytest.mark.slow
# H and I with room for GPTQ's group of 128 on both FC1 (K = H) and FC2 (K = I); Fp16MoePlugin's 64-row blocks
DIMS = dict(num_experts=128, num_experts_per_tok=8, hidden_size=256, moe_intermediate_size=128, head_dim=32)


def _export(capsys, ckpt, out, target, *args) -> str:
    code = cli.main(["export", "--model", str(ckpt), "--output_dir", str(out), "--target", target,
                     "--dtype", "float16", "--verify", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "verify PASSED" in captured.out and "MoE experts used over the run" in captured.out, captured.out
    return captured.out + captured.err


@pytest.mark.parametrize("target,dtype,seed", [("edgellm-0.11", "bfloat16", 0), ("edgellm-0.11", "float32", 1)])
def test_fp16_experts(models, tmp_path, capsys, target, dtype, seed):
    _export(capsys, models.checkpoint("qwen3_moe", dtype, seed=seed, **DIMS), tmp_path / "out", target)


def test_fp16_experts_on_09_warn_naming_091(models, tmp_path, capsys):
    text = _export(capsys, models.checkpoint("qwen3_moe", "bfloat16", **DIMS), tmp_path / "out", "edgellm-0.9")
    assert "0.9.1" in text


@pytest.mark.parametrize("target,dtype,seed", [("edgellm-0.11", "bfloat16", 0), ("edgellm-0.11", "bfloat16", 2),
                                               ("edgellm-0.9", "bfloat16", 2), ("edgellm-0.11", "float32", 1)])
def test_quantize_int4(models, tmp_path, capsys, target, dtype, seed):
    _export(capsys, models.checkpoint("qwen3_moe", dtype, seed=seed, **DIMS), tmp_path / "out", target,
            "--quantize", "int4")


@pytest.mark.parametrize("target", ["edgellm-0.9", "edgellm-0.11"])
def test_gptq_checkpoint(models, tmp_path, capsys, target):
    ckpt = qp.write(models.checkpoint("qwen3_moe", **DIMS), tmp_path / "gptq", "gptq", sym=True)
    _export(capsys, ckpt, tmp_path / "out", target)
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "Int4MoePlugin" for n in graph.node) == 2
