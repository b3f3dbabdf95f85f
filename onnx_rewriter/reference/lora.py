"""LoRA inputs of a `--lora` folder on the CPU reference: a PEFT adapter converted as the runtime wants it,
or the rank-0 dummies the runtime binds to every slot no adapter fills.

The conversion is NVIDIA's `tensorrt-edgellm-process-lora` (contract §13.3): keys lose `base_model.model.`
(and gain `model.` when missing), `lora_A` `[r, K]` becomes `[K, r]`, `lora_B` `[N, r]` becomes `[r, N]`
scaled by `lora_alpha / r` (`/ sqrt(r)` with rsLoRA), everything in the graph's float type.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import RewriteError
from ..modelio.config_file import read_config

SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def lora_inputs(model) -> dict:
    """name -> (static dims with None for the rank) of the graph's LoRA inputs."""
    out = {}
    for i in model.graph.input:
        if i.name.endswith(SUFFIXES):
            out[i.name] = [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
    return out


def dummy_feeds(inputs: dict, np_float) -> dict:
    """Rank-0 A `[K, 0]` and B `[0, N]`: what the runtime binds where no adapter gives a slot its weights."""
    return {name: np.zeros([0 if d is None else d for d in dims], dtype=np_float) for name, dims in inputs.items()}


def adapter_feeds(adapter_dir, inputs: dict, np_float) -> dict:
    """The adapter's tensors under the graph's LoRA input names (every input the adapter names must exist)."""
    folder = Path(adapter_dir)
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise RewriteError(f"--lora-adapter '{folder}' is not a PEFT adapter folder (adapter_config.json and "
                           f"adapter_model.safetensors)")
    cfg = read_config(cfg_path, fix="give a PEFT adapter folder")
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("alpha_pattern") or cfg.get("use_dora"):
        raise RewriteError(f"--lora-adapter '{folder}': only plain LoRA adapters (no alpha_pattern, no DoRA) are "
                           f"supported")
    from safetensors.numpy import load_file

    alpha = float(cfg.get("lora_alpha", cfg.get("r", 1)))
    rs = bool(cfg.get("use_rslora"))
    feeds = {}
    for key, value in load_file(str(weights)).items():
        name = key.removeprefix("base_model.model.")
        name = name if name.startswith("model.") else "model." + name
        if "norm" in name or "lm_head" in name:  # dropped by process-lora: the runtime has no slot for them
            continue
        if not name.endswith(SUFFIXES):
            raise RewriteError(f"--lora-adapter: tensor '{key}' is not a LoRA A/B matrix")
        if name not in inputs:
            raise RewriteError(f"--lora-adapter: '{key}' has no LoRA input '{name}' in the folder (was it "
                               f"rewritten with --lora from this model?)")
        value = np.asarray(value, dtype=np.float32).T
        if name.endswith(".lora_B.weight"):
            r = value.shape[0]
            value = value * (alpha / (math.sqrt(r) if rs else r))
        feeds[name] = np.ascontiguousarray(value.astype(np_float))
    if not feeds:
        raise RewriteError(f"--lora-adapter '{folder}' holds no LoRA matrix the folder can take")
    return feeds
