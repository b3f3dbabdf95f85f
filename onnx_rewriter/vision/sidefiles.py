"""visual/config.json and visual/preprocessor_config.json (docs/contract.md, "Vision encoder side files")."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RewriteError

# The runtime's Qwen vision runner fails init without these (model_type and rope_scaling apart).
TOKEN_KEYS = ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")


def _text_value(config, key):
    text = getattr(config, "text_config", None)
    value = getattr(text, key, None) if text is not None else None
    return value if value is not None else getattr(config, key, None)


def runtime_rope_scaling(config) -> dict:
    """The text config's rope parameters with `type` / `rope_type` "default", keeping mrope_section (and
    mrope_interleaved): the runtime reads "default" plus mrope_section as M-RoPE."""
    params = dict(_text_value(config, "rope_parameters") or _text_value(config, "rope_scaling") or {})
    section = params.get("mrope_section")
    if not section or len(section) != 3 or min(section[1:]) <= 0:
        raise RewriteError(f"the text config has no usable mrope_section ({section!r}); the runtime's vision "
                           "runner needs [t, h, w] with h, w > 0")
    params.pop("rope_theta", None)
    return {**params, "type": "default", "rope_type": "default"}


def visual_config(config) -> dict:
    """visual/config.json from the HF VLM config."""
    out = {"model_type": config.model_type, "vision_config": config.vision_config.to_dict()}
    for key in TOKEN_KEYS:
        value = getattr(config, key, None)
        if value is None:
            raise RewriteError(f"the model config has no {key}; the runtime's vision runner needs it")
        out[key] = value
    params = _text_value(config, "rope_parameters") or {}
    out["vocab_size"] = _text_value(config, "vocab_size")
    out["rope_theta"] = params.get("rope_theta", _text_value(config, "rope_theta"))
    out["rope_scaling"] = runtime_rope_scaling(config)
    return out


def preprocessor_config(checkpoint: Path | None) -> dict:
    """The checkpoint's preprocessor_config.json, or processor_config.json's "image_processor"."""
    if checkpoint is not None and checkpoint.is_dir():
        pre, proc = checkpoint / "preprocessor_config.json", checkpoint / "processor_config.json"
        if pre.is_file():
            return json.loads(pre.read_text())
        if proc.is_file() and isinstance(json.loads(proc.read_text()).get("image_processor"), dict):
            return json.loads(proc.read_text())["image_processor"]
    where = f"in '{checkpoint}'" if checkpoint is not None else "(no checkpoint folder known)"
    raise RewriteError(f"no preprocessor_config.json (or processor_config.json with an image_processor) {where}; "
                       "the runtime's vision runner reads patch_size, merge_size, image_mean and image_std from it: "
                       "give the checkpoint folder (checkpoint=...)")


def write(folder: Path, config, checkpoint: Path | None) -> list[str]:
    files = {"config.json": visual_config(config), "preprocessor_config.json": preprocessor_config(checkpoint)}
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2, default=str) + "\n")
    return list(files)
