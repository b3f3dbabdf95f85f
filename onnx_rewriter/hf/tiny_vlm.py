"""Tiny random Qwen2.5-VL and Qwen3-VL checkpoints, with processor files and synthetic images.

Like `hf/tiny.py`, everything is made locally (no model hub): the tiny BPE tokenizer of `hf/tiny.py` plus
the Qwen vision special tokens, a `preprocessor_config.json` written here, a Qwen-VL chat template that
expands `{"type": "image"}` items, and a random model built from the transformers config classes.

Sizes are chosen so the runtime's limits hold (M-RoPE tables only for rotary dim 64 or 128, non-interleaved
sections divisible by 8) and every path is exercised: Qwen2.5-VL has one windowed and one full-attention
vision block (window 56 px = 2x2 merged tokens, so a 112x112 image has 4 windows); Qwen3-VL has two
deepstack indexes (features added after text layers 0 and 1).
"""

from __future__ import annotations

import json

from .tiny import build_tokenizer, perturb
from .vlm import encode, load_image_processor, synthetic_images  # noqa: F401  (the tests' inputs: production code)

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL-style ChatML: string content as is, list content item by item, images as the vision block
# the processor expands to one <|image_pad|> per merged image token.
VLM_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' or 'image' in item %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Text decoder shared by both families: head_dim 64 (the smallest rotary dim the runtime's M-RoPE
# tables accept), GQA 2:1, 2 layers.
_TEXT = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=64, max_position_embeddings=512, rms_norm_eps=1e-6,
    initializer_range=0.1,  # see hf/tiny.py _BASE: larger than HF's default so attention is not uniform
)

FAMILIES = {
    "qwen2_5_vl": dict(
        config="Qwen2_5_VLConfig",
        model="Qwen2_5_VLForConditionalGeneration",
        # 32 frequency pairs: T 16, H 8, W 8 (each divisible by 8, as the runtime requires); a theta that is not round
        text=dict(_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 999100.0,
                                          "mrope_section": [16, 8, 8]}),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                    patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                    fullatt_block_indexes=[1], tokens_per_second=2, initializer_range=0.1),
        processor=dict(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor",
                       patch_size=14),
    ),
    "qwen3_vl": dict(
        config="Qwen3VLConfig",
        model="Qwen3VLForConditionalGeneration",
        # interleaved: pairs 1, 4, ... < 30 are H, 2, 5, ... < 30 are W, the rest T ([24, 20, 20] scaled to 32)
        text=dict(_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [12, 10, 10], "mrope_interleaved": True}),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                    patch_size=16, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64,
                    deepstack_visual_indexes=[0, 1], initializer_range=0.1),
        processor=dict(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen3VLProcessor",
                       patch_size=16),
    ),
}

# Images between 4 and 64 merged tokens: small enough for fast tests, large enough for several windows.
_MIN_PIXELS, _MAX_PIXELS = 32 * 32, 128 * 128


def _round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def preprocessor_config(family: str) -> dict:
    """The image processor config written beside the checkpoint (what `visual/preprocessor_config.json` copies)."""
    p = FAMILIES[family]["processor"]
    return {
        "image_processor_type": p["image_processor_type"],
        "processor_class": p["processor_class"],
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": _MIN_PIXELS, "max_pixels": _MAX_PIXELS,
        "size": {"shortest_edge": _MIN_PIXELS, "longest_edge": _MAX_PIXELS},
        "patch_size": p["patch_size"], "temporal_patch_size": 2, "merge_size": 2,
    }


def build_vlm_tokenizer(out_dir):
    """hf/tiny.py's tokenizer plus the Qwen vision special tokens and the VLM chat template."""
    from transformers import AutoTokenizer

    out = build_tokenizer(out_dir, chat_template=VLM_CHAT_TEMPLATE)
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_tokens(VISION_TOKENS, special_tokens=True)
    tok.save_pretrained(out)
    return out


def build_vlm_checkpoint(family: str, out_dir, *, dtype: str = "float32", seed: int = 0):
    """Build a tiny random `family` VLM (config, safetensors, tokenizer, processor files) into `out_dir`."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    if family not in FAMILIES:
        raise ValueError(f"unknown VLM family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    spec = FAMILIES[family]
    out = build_vlm_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}

    text = dict(spec["text"], vocab_size=_round_up(len(tok)), bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = getattr(transformers, spec["config"])(
        text_config=text, vision_config=dict(spec["vision"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, spec["model"])._from_config(config, dtype=torch.float32)
    perturb(model, seed)  # random q/k/v (and vision) biases, non-unit norms: see hf/tiny.py
    model = model.to(getattr(torch, dtype)).eval()
    model.config.dtype = dtype
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(family), indent=2) + "\n")
    (out / "chat_template.jinja").write_text(VLM_CHAT_TEMPLATE)
    return out


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m onnx_rewriter.hf.tiny_vlm",
                                description="Build a tiny random-weight VLM checkpoint (config, safetensors, "
                                "tokenizer, preprocessor_config.json) for tests and demos.")
    p.add_argument("family", choices=sorted(FAMILIES), help="VLM family")
    p.add_argument("out_dir", help="folder to write the checkpoint into")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(build_vlm_checkpoint(args.family, args.out_dir, dtype=args.dtype, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
