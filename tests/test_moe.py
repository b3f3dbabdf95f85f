"""Mixture-of-Experts models today (issue 28): every one is refused in one line naming MoE and the reason, on
every route (export of a checkpoint, rewrite / inspect of a plain export), with no output left behind.

The plain export is transformers' own ("batched_mm" experts: the default "grouped_mm" does not convert to ONNX,
and the "eager" loop does not trace; docs/contract.md, "Mixture-of-Experts"), of the tiny Qwen3-MoE family.
"""

from __future__ import annotations

import json

import pytest

from onnx_rewriter.features.moe import support
from tests.test_errors import assert_no_output, assert_refused, run_cli

QWEN3_MOE = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "num_experts": 128, "num_experts_per_tok": 8}


@pytest.mark.parametrize("config,target,words", [
    (QWEN3_MOE, "edgellm-0.11", ["Mixture-of-Experts", "qwen3_moe: 128 experts, top-8", "not supported yet"]),
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts
    ({**{k: v for k, v in QWEN3_MOE.items() if k != "num_experts"}, "num_local_experts": 8}, "edgellm-0.9",
     ["8 experts"]),
    ({"model_type": "qwen2_moe", "num_hidden_layers": 24, "num_experts": 60, "num_experts_per_tok": 4},
     "edgellm-0.10", ["qwen2_moe: 60 experts, top-4"]),
    ({"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2}, "edgellm-0.9",
     ["mixtral: 8 experts"]),
    (QWEN3_MOE, "edgellm-0.5", ["Mixture-of-Experts", "edgellm-0.5", "no MoE plugin"]),
    ({"model_type": "gpt_oss", "num_local_experts": 32, "num_experts_per_tok": 4}, "edgellm-0.11",
     ["GPT-OSS", "Mixture-of-Experts", "biases", "no EdgeLLM MoE plugin"]),
    ({"model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8, "kv_lora_rank": 512},
     "edgellm-0.11", ["DeepSeek", "MLA", "no EdgeLLM attention plugin"]),
    ({"model_type": "deepseek_v2", "kv_lora_rank": 512}, "edgellm-0.9", ["MLA"]),  # MLA alone is enough
    ({**QWEN3_MOE, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, "edgellm-0.11",
     ["Mixture-of-Experts", "FP8", "no EdgeLLM MoE plugin reads FP8 or INT8"]),
    ({**QWEN3_MOE, "quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
        "group_0": {"weights": {"num_bits": 8, "type": "int"}}}}}, "edgellm-0.11", ["INT8 (compressed-tensors)"]),
    ({**QWEN3_MOE, "quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8"}}, "edgellm-0.10",
     ["ModelOpt FP8"]),
    ({**QWEN3_MOE, "quantization_config": {"quant_method": "gptq", "bits": 8}}, "edgellm-0.10", ["INT8 (gptq"]),
    # a VLM's decoder (Qwen3-VL-MoE keeps it in text_config)
    ({"model_type": "qwen3_vl_moe", "text_config": QWEN3_MOE}, "edgellm-0.11", ["128 experts"]),
])
def test_refusal_names_moe_and_the_reason(config, target, words):
    why = support.refusal(config, target)
    assert why is not None and "\n" not in why
    for w in words:
        assert w in why, (w, why)


@pytest.mark.parametrize("config", [
    {"model_type": "llama", "num_hidden_layers": 2},
    {"model_type": "qwen2_moe", "num_hidden_layers": 2, "num_experts": 8, "mlp_only_layers": [0, 1]},  # all dense
    {"model_type": "qwen3_moe", "num_experts": 0},
    {"model_type": "llama", "quantization_config": {"quant_method": "fp8"}},  # dense: the INT4 rules say no to it
])
def test_dense_models_are_not_moe_refusals(config):
    assert support.refusal(config, "edgellm-0.9") is None


@pytest.mark.parametrize("config,words", [
    ({"model_type": "gpt_oss", "num_local_experts": 32, "num_experts_per_tok": 4, "hidden_size": 64,
      "num_hidden_layers": 2}, ["GPT-OSS", "biases"]),
    ({"model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8, "kv_lora_rank": 512,
      "hidden_size": 64, "num_hidden_layers": 2}, ["DeepSeek", "MLA"]),
    ({**QWEN3_MOE, "hidden_size": 64, "quantization_config": {"quant_method": "fp8"}}, ["FP8"]),
])
def test_export_refuses_before_loading(tmp_path, capsys, config, words):
    """Only a config.json: the refusal comes before any weight is looked for."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", "--model", ckpt, "--output-dir", out)
    assert_refused(code, err, str(ckpt), *words)
    assert_no_output(out)


# ------------------------------------------------------------------ the tiny Qwen3-MoE, exported


@pytest.fixture(scope="module")
def moe_baseline(models, tmp_path_factory):
    """The tiny Qwen3-MoE's plain export (batched_mm experts), its config.json and tokenizer beside it."""
    import torch
    from transformers import AutoModelForCausalLM

    from onnx_rewriter.hf.export import export_baseline

    ckpt = models.checkpoint("qwen3_moe")
    out = tmp_path_factory.mktemp("qwen3_moe_base")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa",
                                                 experts_implementation="batched_mm").eval()
    export_baseline(model, out / "model.onnx")
    models.copy_side_files(ckpt, out)
    return ckpt, out / "model.onnx"


@pytest.mark.parametrize("target", ["edgellm-0.9", "edgellm-0.5"])
def test_export_of_the_tiny_qwen3_moe_is_refused(models, moe_baseline, tmp_path, capsys, target):
    ckpt, _ = moe_baseline
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", "--model", ckpt, "--output-dir", out, "--target", target)
    words = ["no MoE plugin", "edgellm-0.5"] if target == "edgellm-0.5" else ["not supported yet"]
    assert_refused(code, err, "Mixture-of-Experts", "qwen3_moe: 8 experts, top-2", *words)
    assert_no_output(out)


def test_plain_moe_export_is_refused_naming_the_router(moe_baseline, tmp_path, capsys):
    """Without a config.json the graph says it: the router (Softmax -> TopK) of layer 0, E and k read off it; it used
    to be reported as an attention layer that did not match ('expected MatMul, found Gemm')."""
    _, base = moe_baseline
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.onnx").symlink_to(base)
    (bare / "model.onnx.data").symlink_to(base.with_name("model.onnx.data"))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, bare / "model.onnx", out, "--no-tokenizer")
    last = assert_refused(code, err, "layer 0", "Mixture-of-Experts router", "Softmax", "TopK", "8 experts, top-2",
                          "I = 64", "top-k weights renormalized", "not supported yet", "(and 1 more layers)")
    assert "expected MatMul" not in last
    assert_no_output(out)
    code, _, err = run_cli(capsys, bare / "model.onnx", out, "--no-tokenizer", "--target", "edgellm-0.5")
    assert_refused(code, err, "router", "edgellm-0.5", "no MoE plugin")
    # with its config.json beside it: the same (the config adds nothing the graph did not say); inspect: a report,
    # exit code 1
    code, _, err = run_cli(capsys, base, out)
    assert_refused(code, err, "layer 0", "Mixture-of-Experts router", "8 experts, top-2, I = 64")
    code, _, err = run_cli(capsys, base, out, "--target", "edgellm-0.5")  # the config's reason, before matching
    assert_refused(code, err, "Mixture-of-Experts model (qwen3_moe: 8 experts, top-2)", "edgellm-0.5")
    code, stdout, err = run_cli(capsys, "inspect", base)
    assert code == 1 and "Mixture-of-Experts" in stdout + err
    assert_no_output(out)


def test_tiny_qwen3_moe_export_graph_form(moe_baseline):
    """What docs/contract.md says a plain Qwen3-MoE export holds, per routed layer: router Gemm -> Softmax -> TopK,
    ReduceSum + Div (renormalization), the experts as GatherND of the stacked [E, 2I, H] / [E, H, I] weights + MatMul
    per (token, choice), a Split into gate / up, ReduceSum over the k choices."""
    import onnx

    _, base = moe_baseline
    g = onnx.load(base, load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("TopK") == 2 and ops.count("GatherND") >= 4
    dims = sorted(tuple(i.dims) for i in g.initializer if len(i.dims) == 3)
    assert dims == [(8, 128, 64), (8, 128, 64), (8, 128, 128), (8, 128, 128)]
    assert not any(n.domain not in ("", "ai.onnx") for n in g.node)
