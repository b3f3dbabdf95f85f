"""The vision-encoder tests shared by both families (each family's file imports them and defines `family`;
the fixtures are in conftest.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from onnx_rewriter import targets
from onnx_rewriter.errors import PatternMismatch, UnsupportedModel
from onnx_rewriter.vision import export, export_visual, host, rewrite, tower_of, towers, verify, verify_visual
from tests.vision.conftest import TARGETS

CONTRACT_INPUTS = {  # name: (elem type, rank), in order
    "qwen2_5_vl": [("input", 10, 2), ("rotary_pos_emb", 1, 2), ("cu_seqlens", 6, 1), ("cu_window_seqlens", 6, 1),
                   ("window_index", 7, 1), ("reverse_window_index", 7, 1), ("max_seqlen_carrier", 6, 1)],
    "qwen3_vl": [("input", 10, 2), ("rotary_pos_emb", 1, 2), ("cu_seqlens", 6, 1), ("fast_pos_embed_idx", 7, 2),
                 ("fast_pos_embed_weight", 10, 2), ("max_seqlen_carrier", 6, 1)],
}


def test_wrapper_computes_the_tower(vlm, family, images):
    """The traced wrapper, fed the host inputs, equals transformers' tower (fp32)."""
    visual = tower_of(vlm.model)
    pix, grid = verify.process_images(vlm.ckpt, images)
    feeds = host.encoder_inputs(family, pix, grid, visual.config, float_type=np.float32)
    with torch.no_grad():
        ours = towers.TOWERS[family](visual)(*(torch.from_numpy(feeds[n]) for n in towers.INPUTS[family]))
    ref = verify.tower_outputs(visual, pix, grid)
    ours = ours if isinstance(ours, tuple) else (ours,)
    assert len(ours) == len(ref)
    for value, name in zip(ours, ref):
        np.testing.assert_allclose(value.numpy(), ref[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
def test_verify_passes(exported, vlm, target, images):
    result = verify_visual(exported[target].folder, vlm.model, images)
    print(f"\n{target}\n{result.table()}")
    assert result.passed, result.table()
    names = ["output"] + [f"deepstack_features_{i}" for i in
                          range(len(getattr(tower_of(vlm.model), "deepstack_visual_indexes", [])))]
    assert [o.name for o in result.outputs] == names
    assert result.outputs[0].shape == (22, 128)  # 112x112 -> 16 tokens, 56x84 -> 6 tokens


@pytest.mark.parametrize("target", TARGETS)
def test_graph_io_and_plugins(exported, family, vlm, target):
    model = onnx.load(str(exported[target].visual / "model.onnx"))
    got = [(i.name, i.type.tensor_type.elem_type, len(i.type.tensor_type.shape.dim)) for i in model.graph.input]
    assert got == CONTRACT_INPUTS[family]
    visual = tower_of(vlm.model)
    assert [o.name for o in model.graph.output] == towers.output_names(family, visual)
    assert all(o.type.tensor_type.elem_type == 10 for o in model.graph.output)
    assert not [n for n in model.graph.node if n.op_type == "Softmax"]
    plugins = [n for n in model.graph.node if n.op_type == "ViTAttentionPlugin"]
    assert len(plugins) == visual.config.depth == 2
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in plugins[0].attribute}
    expected = {"num_heads": 2, "head_size": 32, "attention_scale": pytest.approx(32 ** -0.5, rel=1e-7)}
    if target == "edgellm-0.11":
        expected["qkv_scales"] = [1.0, 1.0, 1.0]
    assert attrs == expected
    assert {n.domain for n in plugins} == {"trt_edgellm"}
    windowed = family == "qwen2_5_vl"
    assert [n.input[3] for n in plugins] == (["cu_window_seqlens", "cu_seqlens"] if windowed else ["cu_seqlens"] * 2)
    carriers = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    assert plugins[1].input[4] == "max_seqlen_carrier"
    if windowed:  # window blocks: a constant zeros carrier of (window_size / patch_size)^2 = (56/14)^2
        assert carriers[plugins[0].input[4]].shape == (16,) and carriers[plugins[0].input[4]].dtype == np.int32
    report = exported[target].report
    assert [b["attention"] for b in report["blocks"]] == (["window", "full"] if windowed else ["full", "full"])


def test_side_files(exported, family, vlm):
    visual = exported["edgellm-0.9"].visual
    assert sorted(p.name for p in visual.iterdir()) == [".onnx_rewriter.json", "config.json", "model.onnx",
                                                        "model.onnx.data", "preprocessor_config.json"]
    cfg = json.loads((visual / "config.json").read_text())
    hf = vlm.model.config
    assert cfg["model_type"] == family
    assert cfg["vision_config"] == json.loads(json.dumps(hf.vision_config.to_dict(), default=str))  # verbatim
    for key in ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"):
        assert cfg[key] == getattr(hf, key)
    assert cfg["vocab_size"] == hf.text_config.vocab_size
    assert cfg["rope_theta"] == hf.text_config.rope_parameters["rope_theta"]
    assert cfg["rope_scaling"]["type"] == cfg["rope_scaling"]["rope_type"] == "default"
    assert cfg["rope_scaling"]["mrope_section"] == hf.text_config.rope_parameters["mrope_section"]
    assert json.loads((visual / "preprocessor_config.json").read_text()) == \
        json.loads((vlm.ckpt / "preprocessor_config.json").read_text())


def _wrong_feeds(folder, vlm, images, spoil):
    cfg = json.loads((folder / "config.json").read_text())
    pix, grid = verify.process_images(folder, images)
    feeds = verify.encoder_feeds(folder, cfg, pix, grid)
    spoil(feeds)
    return verify.compare_with_tower(folder, cfg, tower_of(vlm.model), pix, grid, feeds=feeds)


def test_wrong_rope_fails_verify(exported, vlm, images):
    """rotary_pos_emb with rows and columns swapped (the halves of the angles exchanged) must fail."""
    def swap(feeds):
        half = feeds["rotary_pos_emb"].shape[1] // 2
        feeds["rotary_pos_emb"] = np.concatenate([feeds["rotary_pos_emb"][:, half:],
                                                  feeds["rotary_pos_emb"][:, :half]], axis=1)
    result = _wrong_feeds(exported["edgellm-0.9"].visual, vlm, images, swap)
    assert not result.passed, result.table()


def test_refuses_target_without_vit_plugin(vlm, tmp_path):
    with pytest.raises(UnsupportedModel, match="target 'edgellm-0.5' cannot run a vision encoder: its runtime has "
                                               "no ViTAttentionPlugin"):
        export_visual(vlm.model, tmp_path / "out", target="edgellm-0.5", checkpoint=vlm.ckpt)
    assert not (tmp_path / "out").exists()


def test_mask_that_is_not_a_segment_mask_is_refused(exported, vlm, family, tmp_path):
    """A plain export whose first block attends across segments (mask all zeros) is refused, not fused."""
    model = onnx.load(str(exported["edgellm-0.9"].plain))
    wheres = [n for n in model.graph.node if n.op_type == "Where"]
    model.graph.node.remove(wheres[0])
    model.graph.node.append(onnx.helper.make_node("Mul", [wheres[0].input[1], wheres[0].input[1]],
                                                  [wheres[0].output[0]]))
    bad = tmp_path / "bad.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(model), str(bad))
    visual = tower_of(vlm.model)
    feeds = export.example_feeds(family, visual, np.float16)
    with pytest.raises(PatternMismatch, match=r"vision block \d: the attention mask '.*' is not the segment mask"):
        rewrite.rewrite(bad, tmp_path / "out" / "model.onnx", visual.config, targets.get("edgellm-0.9"), feeds)
