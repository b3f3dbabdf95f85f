"""Writes the side files a target asks for, beside model.onnx."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .. import targets
from . import chat_template, config_json, tokenizer as tok
from .embedding import write_embedding

log = logging.getLogger(__name__)


def write_side_files(run, out_dir: Path) -> list[str]:
    target = targets.get(run.options.target)
    np_float = np.float32 if run.options.dtype == "float32" else np.float16
    files = [write_embedding(run.embedding[0], run.source.base_dir, out_dir, np_float)]
    cfg = config_json.make_config_json(run.spec, run.hf_config, target.edgellm_version)
    config_json.write_config_json(cfg, out_dir)
    files.append("config.json")
    tok_dir = Path(run.options.tokenizer) if run.options.tokenizer else run.in_path.parent
    tokenizer = tok.load_tokenizer(tok_dir)
    if tokenizer is None:
        missing = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", target.chat_template_file]
        run.warn(f"no tokenizer found in '{tok_dir}' (pass --tokenizer DIR); not written: {', '.join(missing)}")
        return files
    files += tok.write_tokenizer_files(tokenizer, out_dir)
    if target.chat_template_file == "chat_template.jinja":
        files.append(chat_template.write_chat_template_jinja(tokenizer, out_dir).name)
    else:
        files.append(chat_template.write_processed_chat_template(tokenizer, out_dir).name)
    return files
