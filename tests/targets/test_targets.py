"""Every target on five families: numbers (verify against HF, fp32 and fp16) and the written contract.

Rewrites are cheap (< 1 s); the exports behind them come from the shared `models` fixture, except Qwen3,
whose tiny checkpoint has all-ones q/k norm gammas: it gets distinct random gammas per layer and per
q/k (conftest.random_norms), so a gamma dropped, swapped or misplaced in the 0.11 plugin changes logits.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_rewriter.modelio import schema
from onnx_rewriter.verification.llm import verify

from ..support.graph_io import io_signature as _io

FAMILIES = ("llama", "qwen2", "qwen3", "mistral_window", "phi3")
TARGETS = ("edgellm-0.5", "edgellm-0.9", "edgellm-0.10", "edgellm-0.11")
F16, F32, I32, I64 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.INT32, onnx.TensorProto.INT64
# family -> (Hq, Hkv, D, R, window); every tiny family has hidden 64, 2 layers, vocab 320.
DIMS = {"llama": (4, 2, 16, 16, -1), "qwen2": (4, 2, 16, 16, -1), "qwen3": (4, 2, 16, 16, -1),
        "mistral_window": (4, 2, 16, 16, 8), "phi3": (4, 2, 16, 8, -1)}
HIDDEN, LAYERS, VOCAB = 64, 2, 320
DENSE_ATTRS = {"num_q_heads", "num_kv_heads", "head_size", "enable_tree_attention", "enable_fp8_kv_cache",
               "sliding_window_size", "qkv_scales"}
PAGED_ATTRS = DENSE_ATTRS | {
    "enable_context_mask_selector", "enable_vision_block_attention", "attention_scale", "skip_softmax_scale_factor",
    "rms_norm_eps", "enable_qk_norm", "qk_norm_post_rope", "enable_kv_shared", "enable_attention_sink",
    "enable_contiguous_query_swa", "plugin_version"}
ATTRS_010 = DENSE_ATTRS | {
    "enable_context_mask_selector", "enable_vision_block_attention", "attention_scale", "skip_softmax_scale_factor",
    "rms_norm_eps", "enable_qk_norm", "enable_kv_shared"}  # no plugin_version (contract 3 §17.2)
PAGED_INPUTS = ["positions", "query_start_offsets", "query_lengths", "past_lengths", "attention_sequence_lengths",
                "state_indices", "execution_phase_marker", "context_sequence_count_carrier", "kv_page_table",
                "logits_indices"]


# edgellm-0.9 (the default target) is verified on these families by tests/test_coverage.py's rows.
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("target", [t for t in TARGETS if t != "edgellm-0.9"])
@pytest.mark.parametrize("family", FAMILIES)
def test_verify(rewritten, family, target, dtype):
    out, ckpt = rewritten(family, target, dtype)
    result = verify(out, model=str(ckpt), steps=4, quiet=True)
    assert result.passed, f"{family} {target} {dtype}: {result.criterion}\n{result.table()}"


def test_paged_non_default_scale_is_the_attribute(models, tmp_path):
    """0.11 cannot pre-scale q (a q/k norm may follow): Gemma3's query_pre_attn_scalar 24 (head size 16)
    must arrive as attention_scale = 24^-1/2 on every plugin, and the numbers must follow it."""
    from onnx_rewriter.pipeline import steps as pipeline

    pipeline.rewrite(models.baseline("gemma3", query_pre_attn_scalar=24), tmp_path, target="edgellm-0.11",
                     dtype="float32")
    scales = [_attrs(n)["attention_scale"] for n in _plugins(onnx.load(str(tmp_path / "model.onnx")))]
    assert scales == [pytest.approx(24 ** -0.5, rel=1e-6)] * LAYERS
    result = verify(tmp_path, model=str(models.checkpoint("gemma3", query_pre_attn_scalar=24)), steps=3, quiet=True)
    assert result.passed, result.table()


# ------------------------------------------------------------------ contract: what the file says


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _plugins(model):
    nodes = [n for n in model.graph.node if n.op_type == "AttentionPlugin"]
    assert len(nodes) == LAYERS
    return nodes


def _dynamic(dim):
    return isinstance(dim, str) and dim != ""


def _check_dense(model, family, target):
    hq, hkv, d, r, window = DIMS[family]
    ins, outs = _io(model.graph.input), _io(model.graph.output)
    pasts = [f"past_key_values_{i}" for i in range(LAYERS)]
    assert set(ins) == {"inputs_embeds", "rope_rotary_cos_sin", "context_lengths", "kvcache_start_index",
                        "last_token_ids", *pasts}
    b, s = ins["inputs_embeds"][1][:2]
    assert _dynamic(b) and _dynamic(s)
    assert ins["inputs_embeds"] == (F16, [b, s, HIDDEN])
    for p in pasts:
        assert ins[p][0] == F16 and ins[p][1][0] == b and ins[p][1][1:3] == [2, hkv] and ins[p][1][4] == d
        assert _dynamic(ins[p][1][3])
    rope = ins["rope_rotary_cos_sin"]
    assert rope[0] == F32 and len(rope[1]) == 3 and rope[1][2] == r and _dynamic(rope[1][1])
    assert ins["context_lengths"] == (I32, [b])
    start = ins["kvcache_start_index"]
    assert start[0] == I32 and len(start[1]) == 1 and _dynamic(start[1][0]) and start[1][0] != b
    assert ins["last_token_ids"] == (I64, [b, 1])
    assert list(outs) == ["logits"] + [f"present_key_values_{i}" for i in range(LAYERS)]
    assert outs["logits"] == (F32, [b, 1, VOCAB])
    for i in range(LAYERS):
        assert outs[f"present_key_values_{i}"] == ins[f"past_key_values_{i}"]

    packed = target == "edgellm-0.5"
    for i, node in enumerate(_plugins(model)):
        assert node.domain == "trt"
        assert len(node.input) == (5 if packed else 7) and all(node.input)
        assert list(node.input)[-4:] == [f"past_key_values_{i}", "context_lengths", "rope_rotary_cos_sin",
                                         "kvcache_start_index"]
        assert list(node.output)[1] == f"present_key_values_{i}"
        attrs = _attrs(node)
        assert set(attrs) == (DENSE_ATTRS - {"qkv_scales"} if packed else DENSE_ATTRS)
        assert (attrs["num_q_heads"], attrs["num_kv_heads"], attrs["head_size"]) == (hq, hkv, d)
        assert (attrs["enable_tree_attention"], attrs["enable_fp8_kv_cache"]) == (0, 0)
        assert attrs["sliding_window_size"] == window
        if not packed:
            assert attrs["qkv_scales"] == [1.0, 1.0, 1.0]


def _check_010(model, family):
    """Contract 3 §17: 0.9's batch-major I/O plus kv_page_table, the paged pool, 6 plugin inputs (+2 gammas)."""
    hq, hkv, d, r, window = DIMS[family]
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 24), ("trt_edgellm", 1)}
    ins, outs = _io(model.graph.input), _io(model.graph.output)
    pasts = [f"past_key_values_{i}" for i in range(LAYERS)]
    assert list(ins) == ["inputs_embeds", *pasts, "rope_rotary_cos_sin", "context_lengths", "kvcache_start_index",
                         "kv_page_table", "last_token_ids"]
    b, s = ins["inputs_embeds"][1][:2]
    assert _dynamic(b) and _dynamic(s) and ins["inputs_embeds"] == (F16, [b, s, HIDDEN])
    for p in pasts:
        assert ins[p][0] == F16 and ins[p][1][0] == 2 and ins[p][1][2:] == [128, hkv, d] and _dynamic(ins[p][1][1])
    rope = ins["rope_rotary_cos_sin"]
    assert rope[0] == F32 and len(rope[1]) == 3 and rope[1][2] == r
    assert ins["context_lengths"] == (I32, [b])
    assert ins["kvcache_start_index"][0] == I32 and ins["kvcache_start_index"][1][0] != b
    table = ins["kv_page_table"]
    assert table[0] == I32 and table[1][1] == 2 and _dynamic(table[1][0]) and table[1][0] != b and _dynamic(table[1][2])
    assert ins["last_token_ids"] == (I64, [b, 1])
    assert list(outs) == ["logits"] + [f"present_key_values_{i}" for i in range(LAYERS)]
    assert outs["logits"] == (F32, [b, 1, VOCAB])
    qk_norm = family == "qwen3"
    inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for i, node in enumerate(_plugins(model)):
        assert node.domain == "trt_edgellm"
        names = list(node.input)
        assert len(names) == (8 if qk_norm else 6) and all(names)
        assert names[1:6] == [f"past_key_values_{i}", "context_lengths", "rope_rotary_cos_sin", "kvcache_start_index",
                              "kv_page_table"]
        qkv = _io([inferred[names[0]]])[names[0]]
        assert qkv[0] == F16 and len(qkv[1]) == 3 and qkv[1][2] == (hq + 2 * hkv) * d
        assert list(node.output)[1] == f"present_key_values_{i}"
        attrs = _attrs(node)
        assert set(attrs) == ATTRS_010
        assert (attrs["num_q_heads"], attrs["num_kv_heads"], attrs["head_size"]) == (hq, hkv, d)
        assert attrs["sliding_window_size"] == window and attrs["qkv_scales"] == [1.0, 1.0, 1.0]
        assert attrs["attention_scale"] == pytest.approx(d ** -0.5) and attrs["enable_qk_norm"] == int(qk_norm)


def _check_paged(model, family):
    hq, hkv, d, r, window = DIMS[family]
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 24), ("trt_edgellm", 1)}
    ins, outs = _io(model.graph.input), _io(model.graph.output)
    pasts = [f"past_key_values_{i}" for i in range(LAYERS)]
    assert list(ins) == ["inputs_embeds", *pasts, "rope_rotary_cos_sin", *PAGED_INPUTS]
    t = ins["inputs_embeds"][1][0]
    assert _dynamic(t) and ins["inputs_embeds"] == (F16, [t, HIDDEN])
    for p in pasts:
        assert ins[p][0] == F16 and ins[p][1][0] == 2 and ins[p][1][2:] == [128, hkv, d] and _dynamic(ins[p][1][1])
    assert ins["rope_rotary_cos_sin"] == (F32, [t, r])
    assert ins["positions"] == (I32, [t])
    n = ins["query_lengths"][1][0]
    for name in ("query_lengths", "past_lengths", "attention_sequence_lengths", "state_indices"):
        assert ins[name] == (I32, [n])
    for name in ("query_start_offsets", "execution_phase_marker", "context_sequence_count_carrier"):
        assert ins[name][0] == I32 and len(ins[name][1]) == 1 and _dynamic(ins[name][1][0])
    assert ins["query_start_offsets"][1][0] != n  # N + 1
    table = ins["kv_page_table"]
    assert table[0] == I32 and table[1][:2] == [n, 2] and _dynamic(table[1][2])
    assert ins["logits_indices"][0] == I64 and len(ins["logits_indices"][1]) == 1
    assert list(outs) == ["logits"] + [f"present_key_values_{i}" for i in range(LAYERS)]
    assert outs["logits"] == (F32, [ins["logits_indices"][1][0], VOCAB])
    for i in range(LAYERS):
        assert outs[f"present_key_values_{i}"] == ins[f"past_key_values_{i}"]

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qk_norm = family == "qwen3"
    inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    plugin_out = _io(model.graph.value_info)
    for i, node in enumerate(_plugins(model)):
        assert node.domain == "trt_edgellm"
        names = list(node.input)
        assert len(names) == (12 if qk_norm else 10) and all(names)
        gammas = names[6:8] if qk_norm else []
        assert names[1:6] == [f"past_key_values_{i}", "query_lengths", "rope_rotary_cos_sin", "past_lengths",
                              "kv_page_table"]
        assert names[6 + len(gammas):] == ["query_start_offsets", "attention_sequence_lengths",
                                           "execution_phase_marker", "context_sequence_count_carrier"]
        qkv = _io([inferred[names[0]]])[names[0]]
        assert qkv[0] == F16 and len(qkv[1]) == 2 and qkv[1][1] == (hq + 2 * hkv) * d
        for g in gammas:
            assert inits[g].dtype == np.float16 and inits[g].shape == (d,)
        assert list(node.output)[1] == f"present_key_values_{i}"
        assert plugin_out[node.output[0]] == (F16, [t, hq, d])
        attrs = _attrs(node)
        assert set(attrs) == PAGED_ATTRS
        assert (attrs["num_q_heads"], attrs["num_kv_heads"], attrs["head_size"]) == (hq, hkv, d)
        assert attrs["sliding_window_size"] == window and attrs["qkv_scales"] == [1.0, 1.0, 1.0]
        assert attrs["attention_scale"] == pytest.approx(d ** -0.5)
        assert attrs["enable_qk_norm"] == int(qk_norm) and attrs["plugin_version"] == b"1"
        if qk_norm:
            assert attrs["rms_norm_eps"] == pytest.approx(1e-6)
        for flag in ("enable_tree_attention", "enable_fp8_kv_cache", "enable_context_mask_selector",
                     "enable_vision_block_attention", "qk_norm_post_rope", "enable_kv_shared",
                     "enable_attention_sink", "enable_contiguous_query_swa"):
            assert attrs[flag] == 0, flag
        assert attrs["skip_softmax_scale_factor"] == 0.0


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_contract(rewritten, family, target):
    out, _ = rewritten(family, target, "float16")
    model = onnx.load(str(out / "model.onnx"))
    schema.register()
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Softmax", "Cos", "Sin"}
    assert not {"input_ids", "attention_mask", "position_ids"} & {i for n in model.graph.node for i in n.input}
    if target == "edgellm-0.11":
        _check_paged(model, family)
    elif target == "edgellm-0.10":
        _check_010(model, family)
    else:
        _check_dense(model, family, target)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["edgellm_version"] == {"edgellm-0.5": "0.5.0", "edgellm-0.9": "0.9.0", "edgellm-0.10": "0.10.0",
                                      "edgellm-0.11": "0.11.0"}[target]
    paged = target == "edgellm-0.11"
    assert (out / "chat_template.jinja").is_file() == paged
    assert (out / "processed_chat_template.json").is_file() == (not paged)


def test_qwen3_gammas_are_the_checkpoints(rewritten):
    """The 0.11 plugin's gammas are each layer's own q_norm / k_norm weights (fp16), in that order."""
    from safetensors.numpy import load_file

    out, ckpt = rewritten("qwen3", "edgellm-0.11", "float16")
    weights = load_file(str(ckpt / "model.safetensors"))
    model = onnx.load(str(out / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for i, node in enumerate(_plugins(model)):
        for which, name in zip(("q_norm", "k_norm"), node.input[6:8]):
            want = weights[f"model.layers.{i}.self_attn.{which}.weight"].astype(np.float16)
            np.testing.assert_array_equal(inits[name], want)
    # the dense targets keep the norm in the graph
    dense = onnx.load(str(rewritten("qwen3", "edgellm-0.9", "float16")[0] / "model.onnx"))
    assert all(len(n.input) == 7 for n in _plugins(dense))


def test_help_and_inspect_name_each_target_with_its_releases(models):
    from onnx_rewriter import cli
    from onnx_rewriter.pipeline.inspection import inspect

    for cmd in ("rewrite", "inspect"):
        text = " ".join(cli.build_parser(cmd).format_help().split())
        assert "edgellm-0.10: runtime 0.10.x" in text and "edgellm-0.9: runtime 0.6 – 0.9.x" in text, cmd
    lines = inspect(models.baseline("llama"), target="edgellm-0.10").splitlines()
    assert lines[1] == "target: edgellm-0.10 (runtime 0.10.x)"
    assert lines[-1] == "verdict: would rewrite all 2 layers for edgellm-0.10"
