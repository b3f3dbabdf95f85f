"""Mixture-of-Experts models today (issue 28): every one is refused in one line naming MoE and the reason, on
every route (export of a checkpoint, rewrite / inspect of a plain export), with no output left behind.

The plain export is transformers' own ("batched_mm" experts: the default "grouped_mm" does not convert to ONNX,
and the "eager" loop does not trace; docs/contract.md, "Mixture-of-Experts"), of the tiny Qwen3-MoE family.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnx_rewriter.features.moe import support
from tests.test_errors import assert_no_output, assert_refused, run_cli

QWEN3_MOE = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "num_experts": 128, "num_experts_per_tok": 8}


@pytest.mark.parametrize("config,target,words", [
    ({**QWEN3_MOE, "num_experts": 64}, "edgellm-0.9", ["Mixture-of-Experts", "qwen3_moe: 64 experts, top-8",
                                                        "no MoE plugin takes these FP16 experts", "--quantize int4",
                                                        "--moe-dense"]),
    ({**QWEN3_MOE, "num_experts": 64}, "edgellm-0.11", ["64 experts", "128 or 256 experts"]),
    ({**QWEN3_MOE, "num_experts_per_tok": 9}, "edgellm-0.11", ["top-9"]),
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
    ({"model_type": "qwen3_vl_moe", "text_config": {**QWEN3_MOE, "num_experts": 64}}, "edgellm-0.9", ["64 experts"]),
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


def test_what_is_written_is_not_refused_before_the_rewrite():
    """Qwen3-MoE with 128 or 256 experts on edgellm-0.10 / 0.11: the rewrite reads its blocks (the moe feature checks
    them)."""
    assert support.refusal(QWEN3_MOE, "edgellm-0.11") is None
    assert support.refusal(QWEN3_MOE, "edgellm-0.10") is None
    assert support.refusal(QWEN3_MOE, "edgellm-0.9") is None  # Fp16MoePlugin of runtime 0.9.1, with a warning
    e8 = {**QWEN3_MOE, "num_experts": 8}  # Int4MoePlugin takes any expert count
    assert support.refusal(e8, "edgellm-0.9", int4=True) is None and support.refusal(e8, "edgellm-0.9") is not None
    assert support.refusal(e8, "edgellm-0.5", int4=True) is not None
    assert support.refusal({**QWEN3_MOE, "num_experts": 256}, "edgellm-0.11") is None


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
    words = ["no MoE plugin", "edgellm-0.5"] if target == "edgellm-0.5" else ["no MoE plugin takes these FP16"]
    assert_refused(code, err, "Mixture-of-Experts", "qwen3_moe: 8 experts, top-2", *words)
    assert_no_output(out)


def test_plain_moe_export_is_refused_naming_what_it_read(moe_baseline, tmp_path, capsys):
    """Without a config.json the graph says it: the moe_block pattern reads E, k, I and the renormalization off each
    routed block (the router used to be reported as an attention layer: 'expected MatMul, found Gemm'), and the
    moe feature refuses what it cannot write, naming the layers and the reason."""
    _, base = moe_baseline
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.onnx").symlink_to(base)
    (bare / "model.onnx.data").symlink_to(base.with_name("model.onnx.data"))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, bare / "model.onnx", out, "--no-tokenizer", "--target", "edgellm-0.5")
    last = assert_refused(code, err, "Mixture-of-Experts layers 0, 1", "8 experts, top-2, I = 64",
                          "top-k weights renormalized", "edgellm-0.5", "no MoE plugin")
    assert "expected MatMul" not in last
    code, _, err = run_cli(capsys, bare / "model.onnx", out, "--no-tokenizer")  # edgellm-0.9
    assert_refused(code, err, "layer 0", "8 experts (Fp16MoePlugin takes 128 or 256", "--moe-dense")
    code, _, err = run_cli(capsys, bare / "model.onnx", out, "--no-tokenizer", "--target", "edgellm-0.11")
    assert_refused(code, err, "layer 0", "8 experts (Fp16MoePlugin takes 128 or 256")
    # with its config.json beside it: the config's reason where it has one, before matching; inspect: exit code 1
    code, _, err = run_cli(capsys, base, out, "--target", "edgellm-0.5")
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


# ------------------------------------------------------------------ Fp16MoePlugin on edgellm-0.11, verified


@pytest.fixture(scope="module")
def moe128(models, tmp_path_factory):
    """A tiny Qwen3-MoE with 128 experts (what Fp16MoePlugin takes), top-8 (issue 28's case) and its plain export."""
    import torch
    from transformers import AutoModelForCausalLM

    from onnx_rewriter.hf.export import export_baseline

    ckpt = models.checkpoint("qwen3_moe", num_experts=128, num_experts_per_tok=8)
    out = tmp_path_factory.mktemp("qwen3_moe128_base")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, experts_implementation="batched_mm").eval()
    export_baseline(model, out / "model.onnx")
    models.copy_side_files(ckpt, out)
    return ckpt, out / "model.onnx"


def _rewrite_011(base, out, target="edgellm-0.11"):
    import onnx_rewriter

    return onnx_rewriter.rewrite(str(base), str(out), target=target, dtype="float16")


@pytest.mark.parametrize("target,rank", [("edgellm-0.11", 2), ("edgellm-0.10", 3)])
def test_fp16_moe_plugin_verifies(moe128, tmp_path, target, rank):
    """0.11: hidden_states [T, H]; 0.10 (runtimes <= 0.10 check rank 3): [B, S, H], the output reshaped back."""
    import onnx

    import onnx_rewriter

    ckpt, base = moe128
    out = tmp_path / "out"
    run = _rewrite_011(base, out, target)
    model = onnx.load(out / "model.onnx")
    g = model.graph
    typed = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: len(v.type.tensor_type.shape.dim) for v in list(typed.value_info) + list(typed.input)}
    assert all(shapes[n.input[1]] == rank and shapes[n.input[0]] == 2 for n in g.node if n.op_type == "Fp16MoePlugin")
    plugins = [n for n in g.node if n.op_type == "Fp16MoePlugin"]
    assert len(plugins) == 2 and all(n.domain == "trt_edgellm" for n in plugins)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in plugins[0].attribute}
    assert attrs == {"num_experts": 128, "top_k": 8, "hidden_size": 128, "moe_inter_size": 64, "activation_type": 2,
                     "norm_topk_prob": 1, "max_routed_rows": 0}
    ops = {n.op_type for n in g.node}
    assert not ops & {"TopK", "Softmax", "Split"}  # router softmax, top-k and experts: in the plugin
    inits = {i.name: i for i in g.initializer}
    assert not [n for n in g.node if n.op_type == "GatherND" and len(getattr(inits.get(n.input[0]), "dims", ())) == 3]
    producers = {o: n for n in g.node for o in n.output}
    assert producers[plugins[0].input[0]].op_type == "Cast"  # fp32 router logits from the fp16 router GEMM
    inits = {i.name: i for i in g.initializer}
    assert list(inits[plugins[0].input[2]].dims) == [128, 128, 128] and list(inits[plugins[0].input[3]].dims) == \
        [128, 128, 64]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"], cfg["enable_moe_block"],
            cfg["intermediate_size"]) == (128, 8, 64, False, 128)
    assert run.report.features["moe"]["layers"] == [0, 1]
    assert onnx_rewriter.verify(str(out), model=str(ckpt)).passed


@pytest.mark.slow  # ~5 s; the same bugs are mutants caught by default tests (tests/mutants.py, "MoE ...")
def test_fp16_moe_plugin_bugs_fail_verify(moe128, tmp_path, monkeypatch):
    """fc1 in Int4MoePlugin's row order (gate first), or norm_topk_prob flipped: verify must fail."""
    import onnx

    import onnx_rewriter
    from onnx_rewriter.features.moe import layout

    ckpt, base = moe128
    with monkeypatch.context() as mp:
        mp.setattr(layout, "fp16_fc1", layout.int4_fc1)
        _rewrite_011(base, tmp_path / "swapped")
    assert not onnx_rewriter.verify(str(tmp_path / "swapped"), model=str(ckpt)).passed
    out = tmp_path / "flipped"
    _rewrite_011(base, out)
    model = onnx.load(out / "model.onnx")
    for n in model.graph.node:
        for a in n.attribute:
            if n.op_type == "Fp16MoePlugin" and a.name == "norm_topk_prob":
                a.i = 0
    onnx.save(model, out / "model.onnx")
    assert not onnx_rewriter.verify(str(out), model=str(ckpt)).passed


def test_fp16_moe_plugin_on_09_warns_naming_runtime_091(moe128, tmp_path):
    """edgellm-0.9 covers runtimes 0.6-0.9.x and Fp16MoePlugin exists only in 0.9.1: written ([B, S, H], as 0.10)
    with a warning that says so and what works on every 0.9 runtime."""
    _, base = moe128
    run = _rewrite_011(base, tmp_path / "out", "edgellm-0.9")
    assert run.report.features["moe"]["plugin"] == "Fp16MoePlugin"
    warned = [w for w in run.report.warnings if "Fp16MoePlugin" in w]
    assert len(warned) == 1 and "runtime 0.9.1" in warned[0] and "--quantize int4" in warned[0]


@pytest.mark.parametrize("args,words", [
    (["--target", "edgellm-0.11", "--dtype", "float32"], ["--dtype float16"]),
    (["--target", "edgellm-0.11", "--kv-cache", "fp8"], ["--kv-cache fp8", "Mixture-of-Experts", "expert choices"]),
])
def test_fp16_moe_plugin_refusals(moe128, tmp_path, capsys, args, words):
    _, base = moe128
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, base, out, *args)
    assert_refused(code, err, *words)
    assert_no_output(out)


def test_router_whose_block_is_not_read_is_refused_with_the_patterns_reason(moe_baseline, tmp_path, capsys):
    """The SiLU's Sigmoid reading the second half of the gate/up split (not HF's gate, up order): not a block the
    rewriter reads, so the layer is refused with the pattern's failed check instead of being guessed at."""
    import onnx

    _, base = moe_baseline
    model = onnx.load(base, load_external_data=False)
    split = next(n for n in model.graph.node if n.op_type == "Split")
    sigmoid = next(n for n in model.graph.node if n.op_type == "Sigmoid" and n.input[0] == split.output[0])
    sigmoid.input[0] = split.output[1]
    bad = tmp_path / "bad"
    bad.mkdir()
    onnx.save(model, bad / "model.onnx")
    (bad / "model.onnx.data").symlink_to(base.with_name("model.onnx.data"))
    code, _, err = run_cli(capsys, bad / "model.onnx", tmp_path / "out", "--no-tokenizer", "--target", "edgellm-0.11")
    assert_refused(code, err, "layer 0", "Mixture-of-Experts router", "not a routed block onnx_rewriter reads",
                   "SiLU of the gate half")
    assert_no_output(tmp_path / "out")


@pytest.mark.slow
def test_qwen2_moe_shared_expert_and_no_renormalization_on_011(models, tmp_path):
    """Qwen2-MoE with 128 experts: layer 0 dense (mlp_only_layers), layer 1 routed with norm_topk_prob false and a
    shared expert behind a sigmoid gate (it stays in the graph). Verified; norm_topk_prob flipped to 1 fails."""
    import onnx
    import torch
    from transformers import AutoModelForCausalLM

    import onnx_rewriter
    from onnx_rewriter.hf.export import export_baseline

    ckpt = models.checkpoint("qwen2_moe", num_experts=128, num_experts_per_tok=4)
    base = tmp_path / "base"
    base.mkdir()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, experts_implementation="batched_mm").eval()
    export_baseline(model, base / "model.onnx")
    models.copy_side_files(ckpt, base)
    out = tmp_path / "out"
    run = _rewrite_011(base / "model.onnx", out)
    assert run.report.features["moe"]["layers"] == [1] and run.report.features["moe"]["norm_topk_prob"] is False
    m = onnx.load(out / "model.onnx")
    plugins = [n for n in m.graph.node if n.op_type == "Fp16MoePlugin"]
    assert len(plugins) == 1
    assert {a.name: a.i for a in plugins[0].attribute}["norm_topk_prob"] == 0
    assert onnx_rewriter.verify(str(out), model=str(ckpt)).passed
    for a in plugins[0].attribute:
        if a.name == "norm_topk_prob":
            a.i = 1
    onnx.save(m, out / "model.onnx")
    assert not onnx_rewriter.verify(str(out), model=str(ckpt)).passed


@pytest.mark.slow  # ~10 s: the reference dequantizes 2 x 128 Marlin experts; the 8-expert rows cover the plugin in CI
def test_int4_with_128_experts_is_int4_moe_plugin_and_verifies(moe128, tmp_path):
    """--quantize int4 on the 128-expert model: the dense linears that fit the INT4 rules become INT4 GEMMs, the
    experts an Int4MoePlugin (not Fp16MoePlugin), the router stays an fp16 Gemm; verify against the dequantized
    model passes."""
    import onnx

    import onnx_rewriter

    ckpt, base = moe128
    out = tmp_path / "out"
    _int4(base, out, "edgellm-0.11")
    g = onnx.load(out / "model.onnx", load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("Int4MoePlugin") == 2 and "Fp16MoePlugin" not in ops
    assert ops.count("Int4GroupwiseGemmPluginV2") >= 2 and ops.count("Gemm") == 2
    assert onnx_rewriter.verify(str(out), model=str(ckpt)).passed


# ------------------------------------------------------------------ Int4MoePlugin (--quantize int4), verified


def _int4(base, out, target):
    import onnx_rewriter

    return onnx_rewriter.rewrite(str(base), str(out), target=target, quantize="int4")


@pytest.mark.parametrize("target,rank", [("edgellm-0.11", 2), ("edgellm-0.9", 3)])
def test_int4_moe_plugin_verifies(moe_baseline, tmp_path, target, rank):
    """The tiny Qwen3-MoE (8 experts: no Fp16MoePlugin) with --quantize int4: one Int4MoePlugin per layer, experts
    quantized by groupwise RTN (G = 64: I = 64) into Marlin bytes; verify compares with transformers holding the
    same dequantized experts, computed from its own weights (not from the bytes)."""
    import onnx

    import onnx_rewriter

    ckpt, base = moe_baseline
    out = tmp_path / "out"
    run = _int4(base, out, target)
    assert run.report.features["moe"]["plugin"] == "Int4MoePlugin"
    model = onnx.load(out / "model.onnx")
    plugins = [n for n in model.graph.node if n.op_type == "Int4MoePlugin"]
    assert len(plugins) == 2
    assert {a.name: a.i for a in plugins[0].attribute} == {"num_experts": 8, "top_k": 2, "hidden_size": 128,
                                                          "moe_inter_size": 64, "activation_type": 0,
                                                          "quantization_group_size": 64}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    assert [inits[t] for t in plugins[0].input[2:]] == [[8, 8, 1024], [8, 2, 128], [8, 4, 1024], [8, 1, 128]]
    typed = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: len(v.type.tensor_type.shape.dim) for v in list(typed.value_info) + list(typed.input)}
    assert all(shapes[n.input[1]] == rank for n in plugins)
    res = onnx_rewriter.verify(str(out), model=str(ckpt))
    assert res.passed
    # verify says how many of the E experts each plugin routed some row to (measured: 8/8 in both layers)
    assert [(n.split("/")[2], e) for n, e, _ in res.expert_usage] == [("layers.0", 8), ("layers.1", 8)]
    assert all(used >= 6 for _, _, used in res.expert_usage)


@pytest.mark.slow  # ~2.5 s; the mutant "MoE Marlin: grouped scale permutation off by one" is caught by default tests
def test_int4_moe_plugin_scale_permutation_bug_fails_verify(moe_baseline, tmp_path, monkeypatch):
    import onnx_rewriter
    from onnx_rewriter.features.moe import layout

    ckpt, base = moe_baseline
    monkeypatch.setattr(layout, "pack_marlin_scales", lambda s: np.asarray(s, np.float16).copy())  # not permuted
    _int4(base, tmp_path / "out", "edgellm-0.11")
    assert not onnx_rewriter.verify(str(tmp_path / "out"), model=str(ckpt)).passed


@pytest.mark.slow
def test_int4_moe_plugin_with_topk_mass_on_qwen2_moe(models, tmp_path, monkeypatch):
    """Qwen2-MoE (norm_topk_prob false, shared expert, layer 0 dense) with --quantize int4: Int4MoePlugin always
    renormalizes, the graph multiplies by the top-k probability mass; verified on 0.11 and 0.10; without it, fails."""
    import torch
    from transformers import AutoModelForCausalLM

    import onnx_rewriter
    from onnx_rewriter import features
    from onnx_rewriter.hf.export import export_baseline

    ckpt = models.checkpoint("qwen2_moe")
    base = tmp_path / "base"
    base.mkdir()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, experts_implementation="batched_mm").eval()
    export_baseline(model, base / "model.onnx")
    models.copy_side_files(ckpt, base)
    for target in ("edgellm-0.11", "edgellm-0.10"):
        _int4(base / "model.onnx", tmp_path / target, target)
        assert onnx_rewriter.verify(str(tmp_path / target), model=str(ckpt)).passed
    monkeypatch.setattr(features.moe, "_topk_mass", lambda g, prefix, logits, k, out: out)
    _int4(base / "model.onnx", tmp_path / "no_mass", "edgellm-0.11")
    assert not onnx_rewriter.verify(str(tmp_path / "no_mass"), model=str(ckpt)).passed


def test_moe_dense_renormalized(moe_baseline, tmp_path):
    """--moe-dense on a renormalizing model (the tiny Qwen3-MoE, 8 experts, top-2) on edgellm-0.10: the plugin-free
    form (features/moe/dense.py) verifies; with the renormalization dropped it fails (mutant "MoE dense form")."""
    import onnx_rewriter

    ckpt, base = moe_baseline
    out = tmp_path / "out"
    run = onnx_rewriter.rewrite(str(base), str(out), target="edgellm-0.10", moe_dense=True)
    assert run.report.features["moe"]["dense_cost"]["factor"] == 4.0
    assert onnx_rewriter.verify(str(out), model=str(ckpt)).passed
