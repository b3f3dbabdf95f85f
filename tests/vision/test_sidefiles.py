"""visual/config.json and visual/preprocessor_config.json (vision/sidefiles.py), without an export."""

from __future__ import annotations

import json

import pytest
import transformers

from onnx_rewriter.errors import RewriteError
from onnx_rewriter.vision import check_options, sidefiles


def _config(**rope):
    text = dict(vocab_size=384, hidden_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, **rope})
    return transformers.Qwen3VLConfig(text_config=text, vision_config=dict(depth=1, hidden_size=64, num_heads=2),
                                      image_token_id=5, video_token_id=6, vision_start_token_id=3,
                                      vision_end_token_id=4)


def test_visual_config_keys():
    cfg = sidefiles.visual_config(_config(mrope_section=[12, 10, 10], mrope_interleaved=True))
    assert cfg["model_type"] == "qwen3_vl"
    assert (cfg["image_token_id"], cfg["video_token_id"], cfg["vision_start_token_id"], cfg["vision_end_token_id"]) \
        == (5, 6, 3, 4)
    assert cfg["vocab_size"] == 384 and cfg["rope_theta"] == 5e6
    assert cfg["rope_scaling"] == {"type": "default", "rope_type": "default", "mrope_section": [12, 10, 10],
                                   "mrope_interleaved": True}
    assert cfg["vision_config"]["depth"] == 1


def test_mrope_section_without_height_or_width_is_refused():
    with pytest.raises(RewriteError, match=r"no usable mrope_section \(\[32, 0, 0\]\)"):
        sidefiles.visual_config(_config(mrope_section=[32, 0, 0]))


def test_preprocessor_config_from_processor_config(tmp_path):
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"patch_size": 16}}))
    assert sidefiles.preprocessor_config(tmp_path) == {"patch_size": 16}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 14}))
    assert sidefiles.preprocessor_config(tmp_path) == {"patch_size": 14}  # the checkpoint's own file first


def test_missing_preprocessor_config_is_refused(tmp_path):
    with pytest.raises(RewriteError, match=f"no preprocessor_config.json .* in '{tmp_path}'"):
        sidefiles.preprocessor_config(tmp_path)
    with pytest.raises(RewriteError, match=r"\(no checkpoint folder known\)"):
        sidefiles.preprocessor_config(None)


@pytest.mark.parametrize("target, dtype, message", [
    ("edgellm-0.5", "float16", "target 'edgellm-0.5' cannot run a vision encoder"),
    ("edgellm-7", "float16", "unknown target 'edgellm-7'"),
    ("edgellm-0.9", "int8", "unknown dtype 'int8' for the vision encoder"),
])
def test_options_checked_first(target, dtype, message):
    with pytest.raises(RewriteError, match=message):
        check_options(_config(mrope_section=[12, 10, 10]), target, dtype)


def test_unknown_family_is_refused():
    config = transformers.Qwen2VLConfig()
    with pytest.raises(RewriteError, match="no vision encoder route for model_type 'qwen2_vl'"):
        check_options(config, "edgellm-0.9", "float16")


def test_precheck_needs_the_preprocessor_config(tmp_path):
    from onnx_rewriter.vision import precheck

    config = _config(mrope_section=[12, 10, 10])
    with pytest.raises(RewriteError, match="no preprocessor_config.json"):
        precheck(config, "edgellm-0.11", "float16", tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{}")
    assert precheck(config, "edgellm-0.11", "float16", tmp_path) == ("qwen3_vl", tmp_path)
