"""The tiny VLM checkpoints: configs the runtime accepts, processor files that work offline, 3-D positions."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from onnx_rewriter.hf import tiny_vlm  # noqa: E402


@pytest.mark.parametrize("family,sections,interleaved,patch,deepstack", [
    ("qwen2_5_vl", [16, 8, 8], None, 14, None),
    ("qwen3_vl", [12, 10, 10], True, 16, [0, 1]),
])
def test_tiny_vlm_checkpoint(models, family, sections, interleaved, patch, deepstack):
    path = models.vlm_checkpoint(family)
    cfg = json.loads((path / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert cfg["model_type"] == family
    assert text["head_dim"] == 64 and text["num_hidden_layers"] == 2
    assert text["rope_parameters"]["mrope_section"] == sections
    assert text["rope_parameters"].get("mrope_interleaved") == interleaved
    assert vision["patch_size"] == patch and vision["depth"] == 2
    assert vision.get("deepstack_visual_indexes") == deepstack
    if family == "qwen2_5_vl":
        assert vision["fullatt_block_indexes"] == [1] and vision["window_size"] == 56
    pre = json.loads((path / "preprocessor_config.json").read_text())
    assert (pre["patch_size"], pre["temporal_patch_size"], pre["merge_size"]) == (patch, 2, 2)

    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg["image_token_id"] == image_id
    assert cfg["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>What is this?" in prompt

    images = tiny_vlm.synthetic_images()
    assert [im.size for im in images] == [(112, 112), (84, 56)]
    enc = tiny_vlm.encode(path, prompt, images[:1], tokenizer=tok)
    # 112 px -> 8x8 patches (14 px; 16 px patches after resizing to 128) -> 16 merged image tokens
    assert enc["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert int((enc["input_ids"] == image_id).sum()) == 16
    assert int(enc["mm_token_type_ids"].sum()) == 16

    model = getattr(transformers, tiny_vlm.FAMILIES[family]["model"]).from_pretrained(path).eval()
    pos, _ = model.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"])
    first = int(enc["mm_token_type_ids"][0].nonzero()[0])
    # the image's 4x4 merged grid: t constant, h by row, w by column; text resumes after max(h, w) + 1
    assert pos[:, 0, first:first + 16].tolist() == [
        [first] * 16, [first + i // 4 for i in range(16)], [first + i % 4 for i in range(16)]]
    assert pos[0, 0, first + 16].item() == first + 4
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], cfg["text_config"]["vocab_size"])
