"""config.json against the weights, before anything is loaded or traced.

transformers builds the model from config.json and fills it from the safetensors files; where the two
disagree it gives random weights to what the files lack (a third layer) and only logs it. So every size
the config names (layers, hidden, heads, vocab, intermediate) is compared with the tensor shapes in
the files' headers (no tensor is read), and every file is checked to be as long as its header says.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from ..errors import RewriteError
from ..modelio import safetensors_header
from ..sidefiles.config_json import _get, _llm_part

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_EMBEDDING = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def read_header(path: Path) -> dict:
    """The safetensors header of `path` (name -> dtype, shape, data_offsets), checked against the file size."""
    try:
        header = safetensors_header.read_header(path)
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise RewriteError(f"checkpoint file '{path}' is not a readable safetensors file ({exc}); "
                           f"download or save it again") from None
    size = path.stat().st_size
    if size < header.data_end:
        raise RewriteError(f"checkpoint file '{path}' is truncated ({size} bytes, its header needs {header.data_end}); "
                           f"download or save it again")
    return header.tensors


def weight_sizes(shapes: dict[str, tuple]) -> dict[str, tuple[int, str]]:
    """Sizes the tensors imply: field -> (value, the tensor that says so)."""
    out: dict[str, tuple[int, str]] = {}
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER.search(name))}
    if layers:
        out["num_hidden_layers"] = (max(layers) + 1, f"layer indices 0..{max(layers)}")
    emb = next((n for n in sorted(shapes) if n.endswith(_EMBEDDING) and len(shapes[n]) == 2), None)
    if emb:
        out["vocab_size"] = (shapes[emb][0], f"{emb} {list(shapes[emb])}")
        out["hidden_size"] = (shapes[emb][1], f"{emb} {list(shapes[emb])}")
    first = {n: s for n, s in shapes.items() if (m := _LAYER.search(n)) and int(m.group(1)) == 0 and len(s) == 2}

    def rows(suffix):
        n = next((n for n in sorted(first) if n.endswith(suffix)), None)
        return (first[n], n) if n else (None, None)

    for field, suffixes, pick in (("intermediate_size", ("mlp.gate_proj.weight", "mlp.up_proj.weight",
                                                           "mlp.fc_in.weight", "mlp.fc1.weight"), 0),
                                  ("intermediate_size", ("mlp.down_proj.weight",), 1)):
        for suffix in suffixes:
            shape, n = rows(suffix)
            if shape and field not in out:
                out[field] = (shape[pick], f"{n} {list(shape)}")
    shape, n = rows("mlp.gate_up_proj.weight")
    if shape and "intermediate_size" not in out:
        out["intermediate_size"] = (shape[0] // 2, f"{n} {list(shape)} (gate and up)")
    for key, suffix in (("q_rows", "q_proj.weight"), ("k_rows", "k_proj.weight"), ("qkv_rows", "qkv_proj.weight")):
        shape, n = rows(suffix)
        if shape:
            out[key] = (shape[0], f"{n} {list(shape)}")
    return out


def check(files, config: dict, config_name: str = "config.json") -> None:
    """Refuse a checkpoint whose config.json contradicts its safetensors files (naming both values)."""
    shapes: dict[str, tuple] = {}
    dtypes: dict[str, str] = {}
    where: dict[str, Path] = {}
    for f in files:
        for name, info in read_header(Path(f)).items():
            shapes[name] = tuple(info.get("shape", ()))
            dtypes[name] = info.get("dtype")
            where[name] = Path(f)
    for name in [n for n in shapes if n.endswith(".weight") and f"{n}_scale" in shapes and len(shapes[n]) == 2
                 and dtypes[n] == "U8"]:
        if dtypes[f"{name}_scale"] == "F8_E4M3":  # NVFP4 [N, K/2]: two input channels per byte
            shapes[name] = (shapes[name][0], 2 * shapes[name][1])
        else:  # ModelOpt INT4 [N/2, K]: two rows per byte row
            shapes[name] = (2 * shapes[name][0], shapes[name][1])
    if not isinstance(config, dict) or config.get("is_encoder_decoder"):
        return  # an encoder-decoder is refused by name when loaded
    cfg = _llm_part(config)
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "head_dim"):  # torch would fail on a negative size, deep in the load
        said = _get(cfg, field)
        if isinstance(said, int) and not isinstance(said, bool) and said <= 0:
            raise RewriteError(f"'{config_name}' says {field}={said}; a size must be a positive integer: fix "
                               f"config.json or use the checkpoint it belongs to")
    if not shapes:
        return
    sizes = weight_sizes(shapes)

    def refuse(field, said, found, why):
        raise RewriteError(f"'{config_name}' says {field}={said} but the weights have {found} ({why}); "
                           f"fix config.json or use the checkpoint it belongs to")

    for field in ("num_hidden_layers", "hidden_size", "vocab_size", "intermediate_size"):
        said = _get(cfg, field)
        if isinstance(said, int) and field in sizes and sizes[field][0] != said:
            refuse(field, said, sizes[field][0], sizes[field][1])
    heads, hidden = _get(cfg, "num_attention_heads"), _get(cfg, "hidden_size")
    if not isinstance(heads, int) or not isinstance(hidden, int) or heads <= 0:
        return
    kv = _get(cfg, "num_key_value_heads")
    kv = kv if isinstance(kv, int) else heads
    head_dim = cfg.get("head_dim") if isinstance(cfg.get("head_dim"), int) else hidden // heads
    if "q_rows" in sizes and sizes["q_rows"][0] != heads * head_dim:
        refuse("num_attention_heads", heads, f"{sizes['q_rows'][0] / head_dim:g} heads of {head_dim}",
               sizes["q_rows"][1])
    if "k_rows" in sizes and sizes["k_rows"][0] != kv * head_dim:
        refuse("num_key_value_heads", kv, f"{sizes['k_rows'][0] / head_dim:g} heads of {head_dim}",
               sizes["k_rows"][1])
    if "qkv_rows" in sizes and sizes["qkv_rows"][0] != (heads + 2 * kv) * head_dim:
        refuse("num_attention_heads/num_key_value_heads", f"{heads}/{kv}",
               f"{sizes['qkv_rows'][0]} fused q/k/v rows, not {(heads + 2 * kv) * head_dim}", sizes["qkv_rows"][1])
