"""The rewrite end to end on edgellm-0.9: structure of the written folder, and numbers through verify."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from onnx_rewriter.errors import RewriteError
from onnx_rewriter.modelio import schema
from onnx_rewriter.pipeline import steps as pipeline

from .support.graph_io import io_signature as _io

CONTRACT_FILES = {"model.onnx", "embedding.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "processed_chat_template.json"}
F16, F32, I32, I64 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.INT32, onnx.TensorProto.INT64


@pytest.fixture(scope="module")
def qwen2_out(models, tmp_path_factory):
    base = models.baseline("qwen2")
    out = tmp_path_factory.mktemp("qwen2") / "out"
    run = pipeline.rewrite(base, out)
    return base, out, run


def test_qwen2_graph_matches_the_contract(qwen2_out):
    base, out, run = qwen2_out
    assert {p.name for p in out.iterdir()} == CONTRACT_FILES | {".onnx_rewriter.json"}  # + the manifest (safety.py)
    model = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("AttentionPlugin") == 2
    assert not {"Softmax", "Cos", "Sin"} & set(ops)
    plugins = [n for n in model.graph.node if n.op_type == "AttentionPlugin"]
    for i, node in enumerate(plugins):
        assert node.domain == "trt"
        assert list(node.input)[3:] == [f"past_key_values_{i}", "context_lengths", "rope_rotary_cos_sin",
                                        "kvcache_start_index"]
        assert list(node.output)[1] == f"present_key_values_{i}"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_q_heads"] == 4 and attrs["num_kv_heads"] == 2 and attrs["head_size"] == 16
        assert attrs["enable_tree_attention"] == 0 and attrs["sliding_window_size"] == -1
        assert attrs["qkv_scales"] == [1.0, 1.0, 1.0]

    ins, outs = _io(model.graph.input), _io(model.graph.output)
    assert set(ins) == {"inputs_embeds", "past_key_values_0", "past_key_values_1", "rope_rotary_cos_sin",
                        "context_lengths", "kvcache_start_index", "last_token_ids"}
    assert ins["inputs_embeds"][0] == F16 and ins["inputs_embeds"][1][2] == 64
    assert ins["past_key_values_0"][0] == F16 and ins["past_key_values_0"][1][1:3] == [2, 2]
    assert ins["past_key_values_0"][1][4] == 16
    assert ins["rope_rotary_cos_sin"] == (F32, ins["rope_rotary_cos_sin"][1]) and ins["rope_rotary_cos_sin"][1][2] == 16
    assert ins["context_lengths"][0] == I32 and ins["kvcache_start_index"][0] == I32
    # the start index has its own dynamic dim (it may be 0 while the batch is not)
    assert ins["kvcache_start_index"][1][0] != ins["context_lengths"][1][0]
    assert ins["last_token_ids"][0] == I64 and ins["last_token_ids"][1][1] == 1
    assert list(outs) == ["logits", "present_key_values_0", "present_key_values_1"]
    assert outs["logits"][0] == F32 and len(outs["logits"][1]) == 3 and outs["logits"][1][1:] == [1, 320]
    assert outs["present_key_values_1"] == ins["past_key_values_1"]
    names = {i for n in model.graph.node for i in n.input}
    assert not {"input_ids", "attention_mask", "position_ids"} & names

    schema.register()
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    onnx.shape_inference.infer_shapes_path(str(out / "model.onnx"), str(out.parent / "inferred.onnx"))


def test_side_files(qwen2_out):
    _, out, _ = qwen2_out
    from safetensors.numpy import load_file

    emb = load_file(str(out / "embedding.safetensors"))
    assert list(emb) == ["embedding"] and emb["embedding"].dtype == np.float16 and emb["embedding"].shape == (320, 64)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llm" and cfg["edgellm_version"] == "0.9.0" and "builder_config" not in cfg
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["rope_scaling"] is None and cfg["partial_rotary_factor"] == 1.0
    tpl = json.loads((out / "processed_chat_template.json").read_text())
    assert set(tpl["roles"]) == {"system", "user", "assistant"}


def test_report_lists_every_layer(qwen2_out):
    _, _, run = qwen2_out
    assert [l.rewritten for l in run.report.layers] == [True, True]
    assert {"attention_core", "rotate_half", "repeat_kv"} <= set(run.report.layers[0].patterns)


def test_dimensions_come_from_the_graph_alone(models, tmp_path):
    """No config.json, no tokenizer: the graph says everything; missing side files are named."""
    base = models.baseline("qwen2")
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(base, lone / "model.onnx")
    shutil.copy(base.with_name("model.onnx.data"), lone / "model.onnx.data")
    run = pipeline.rewrite(lone / "model.onnx", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]) == (64, 320, 2)
    assert cfg["rope_theta"] == 999100.0  # read off the graph's inv_freq, exactly (not snapped to 1e6)
    assert any("tokenizer" in w and "processed_chat_template.json" in w for w in run.report.warnings)
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_contradicting_config_is_an_error_naming_both_values(models, tmp_path):
    base = models.baseline("qwen2")
    cfg = json.loads(base.with_name("config.json").read_text())
    cfg["num_key_value_heads"] = 4
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(cfg))
    with pytest.raises(RewriteError, match=r"num_key_value_heads.*2.*4|num_key_value_heads.*4.*2"):
        pipeline.rewrite(base, tmp_path / "out", config=bad)
    assert not (tmp_path / "out").exists()
