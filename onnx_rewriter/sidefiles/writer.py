"""Writes the side files a target asks for, beside model.onnx."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import config_json
from . import tokenizer_job as tokenizer_jobs
from .embedding import write_embedding

log = logging.getLogger(__name__)


def write_side_files(run, out_dir: Path) -> list[str]:
    target = run.options.target
    np_float = np.float32 if run.options.dtype == "float32" else np.float16
    files = []
    if all(f.writes_embedding for f in run.features):
        files.append(write_embedding(run.embedding.weight, run.source.base_dir, out_dir, np_float))
    cfg = config_json.make_config_json(run.spec, run.hf_config, target.edgellm_version)
    for feature in run.features:  # the keys a deployment feature adds (features/)
        feature.config(run, cfg)
    config_json.write_config_json(cfg, out_dir)
    files.append("config.json")
    for feature in run.features:
        files += feature.files(run, out_dir)
    tok_dir = tokenizer_dir(run)
    missing = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", target.chat_template_file]
    if not all(f.writes_tokenizer for f in run.features):
        return files
    if run.options.no_tokenizer:
        run.warn(f"--no-tokenizer: not written: {', '.join(missing)} (the runtime needs them: add them by hand)")
        return files
    # Started by step_load (a child process, see tokenizer_job.py), or here.
    job = getattr(run, "tokenizer_job", None) or tokenizer_jobs.start(
        tok_dir, target.chat_template_file, run.options.trust_remote_code)
    written = job.result(out_dir)
    if written is None:
        run.warn(f"no tokenizer found in '{tok_dir}' (pass --tokenizer DIR); not written: {', '.join(missing)}")
        return files
    if not (Path(tok_dir) / "tokenizer.json").is_file():  # converted from a slow tokenizer: step_check saw none
        check_tokenizer_rows(out_dir / "tokenizer.json", tok_dir, int(run.spec["vocab_size"]))
    return files + written


def check_tokenizer_rows(tokenizer_json: Path, tok_dir, vocab_size: int) -> None:
    """A tokenizer may have fewer ids than the embedding has rows (padding rows are normal), never more: its
    ids past the table would index outside it on the runtime."""
    from ..errors import RewriteError
    from .tokenizer import tokenizer_rows

    try:
        rows = tokenizer_rows(Path(tokenizer_json))
    except (OSError, ValueError, TypeError, AttributeError):
        return  # what the tokenizer library wrote and read back; its own errors were reported already
    if rows > vocab_size:
        raise RewriteError(f"the tokenizer in '{tok_dir}' has token ids up to {rows - 1} but the model's embedding "
                           f"has {vocab_size} rows; pass this model's own tokenizer (--tokenizer DIR)")


def tokenizer_dir(run) -> Path:
    return Path(run.options.tokenizer) if run.options.tokenizer else run.in_path.parent
