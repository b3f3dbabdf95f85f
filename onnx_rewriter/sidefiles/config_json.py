"""config.json of the output folder, and the check that the HF config agrees with the graph.

`spec` is what the graph says (authoritative); the HF config.json only fills what a graph cannot
tell (intermediate size when unused, context length, rope scaling, norm epsilon). HF configs come
in several layouts: transformers 5 (`rope_parameters`, possibly nested per layer type as in Gemma3),
transformers 4 (`rope_theta` + `rope_scaling`), GPT-J names (n_embd, n_head, ...) and multimodal
wrappers with the LLM under `text_config`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from onnx_rewriter.errors import RewriteError

log = logging.getLogger(__name__)

DEFAULT_MAX_POSITIONS = 4096
DEFAULT_RMS_NORM_EPS = 1e-6
DEFAULT_ROPE_THETA = 10000.0

# Field -> names it goes by in HF configs, first match wins.
_ALIASES = {
    "vocab_size": ("vocab_size",),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads", "multi_query_group_num"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_hidden_size"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"),
    "rms_norm_eps": ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_epsilon"),
}
# Keys the runtimes' config parser requires (0.8+ refuse a config.json without kv_cache_dtype); every target
# writes all of them. tests/test_sidefiles.py checks each target's output against this list.
REQUIRED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_scaling",
    "partial_rotary_factor", "rms_norm_eps", "model_type", "edgellm_version", "kv_cache_dtype",
)
KV_CACHE_DTYPE = "fp16"  # features/fp8_kv.py writes "fp8" for an FP8 cache
# rope_parameters entries that are not scaling parameters (old configs kept them at the top level).
_NOT_SCALING = ("rope_theta", "partial_rotary_factor")


def _llm_part(hf: dict) -> dict:
    """The decoder's own config: `text_config` of multimodal wrappers, with top-level fallbacks."""
    text = hf.get("text_config")
    return {**hf, **text} if isinstance(text, dict) else dict(hf)


def _get(hf: dict, field: str):
    for name in _ALIASES.get(field, (field,)):
        if hf.get(name) is not None:
            return hf[name]
    return None


def _rope_parameters(hf: dict) -> dict | None:
    """The (global-attention) rope parameters as one flat dict, whatever the config layout."""
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict) and isinstance(rp.get("full_attention"), dict):
        rp = rp["full_attention"]  # Gemma3-style: per layer type; local layers use plain RoPE
    if isinstance(rp, dict):
        return dict(rp)
    # transformers 4 layout: rope_theta beside an optional rope_scaling dict.
    old = dict(hf.get("rope_scaling") or {})
    if hf.get("rope_theta") is not None:
        old.setdefault("rope_theta", hf["rope_theta"])
    return old or None


def _rope_thetas(hf: dict) -> list[float]:
    """Every rope theta the config names (Gemma3 has a global and a local one)."""
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict) and all(isinstance(v, dict) for v in rp.values()) and rp:
        return [float(v["rope_theta"]) for v in rp.values() if v.get("rope_theta") is not None]
    flat = _rope_parameters(hf) or {}
    return [float(flat["rope_theta"])] if flat.get("rope_theta") is not None else []


def rope_thetas(hf_config: dict | None) -> list[float]:
    """Every rope theta an HF config names, whatever its layout."""
    return _rope_thetas(_llm_part(hf_config or {}))


def rope_scaling(hf: dict | None) -> dict | None:
    """Old-style `rope_scaling` (None for plain RoPE) from either config layout."""
    rp = _rope_parameters(_llm_part(hf or {}))
    if not rp:
        return None
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type == "default":
        return None
    out = {k: v for k, v in rp.items() if k not in _NOT_SCALING and k != "type"}
    out["rope_type"] = rope_type
    return out


def _head_dim(hf: dict):
    if hf.get("head_dim") is not None:
        return hf["head_dim"]
    hidden, heads = _get(hf, "hidden_size"), _get(hf, "num_attention_heads")
    return hidden // heads if hidden and heads else None


def _hf_value(hf: dict, field: str):
    if field == "head_dim":
        return _head_dim(hf)
    if field == "num_key_value_heads":  # absent means multi-head attention
        return _get(hf, field) or _get(hf, "num_attention_heads")
    if field == "intermediate_size" and hf.get("n_embd") and _get(hf, field) is None:
        return 4 * hf["n_embd"]  # GPT-2/GPT-J: n_inner null means 4 * hidden
    return _get(hf, field)


def cross_check(spec: dict, hf_config: dict | None) -> None:
    """Raise RewriteError when the HF config contradicts the graph (a config of another model)."""
    if not hf_config:
        return
    hf = _llm_part(hf_config)
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim"):
        graph, conf = spec.get(field), _hf_value(hf, field)
        if graph is not None and conf is not None and int(graph) != int(conf):
            raise _mismatch(field, conf, graph)
    theta, thetas = spec.get("rope_theta"), _rope_thetas(hf)
    if theta is not None and thetas and not any(abs(theta - t) <= 1e-3 * abs(t) for t in thetas):
        raise _mismatch("rope_theta", thetas[0] if len(thetas) == 1 else thetas, theta)


def _mismatch(field, conf, graph) -> RewriteError:
    return RewriteError(
        f"config.json says {field}={conf} but the graph has {field}={graph}; "
        "is the config from the model this ONNX file was exported from?"
    )


def max_positions(hf_config: dict | None) -> int:
    """max_position_embeddings as config.json carries it: the rows of the runtime's RoPE table."""
    return int(_hf_value(_llm_part(hf_config or {}), "max_position_embeddings") or DEFAULT_MAX_POSITIONS)


def make_config_json(spec: dict, hf_config: dict | None, edgellm_version: str) -> dict:
    """The contract's config.json: graph values first, then the HF config, then defaults."""
    if not re.fullmatch(r"\d+\.\d+\.\d+", str(edgellm_version)):
        raise RewriteError(f"edgellm_version must have three parts like 0.9.0, got {edgellm_version!r}")
    hf = _llm_part(hf_config or {})

    def pick(field, default=None):
        if spec.get(field) is not None:
            return spec[field]
        value = _hf_value(hf, field)
        return default if value is None else value

    rp = _rope_parameters(hf) or {}
    head_dim = spec["head_dim"]
    cfg = {
        "vocab_size": spec["vocab_size"],
        "hidden_size": spec["hidden_size"],
        "num_hidden_layers": spec["num_hidden_layers"],
        "num_attention_heads": spec["num_attention_heads"],
        "num_key_value_heads": spec["num_key_value_heads"],
        "head_dim": head_dim,
        "intermediate_size": pick("intermediate_size"),
        "max_position_embeddings": pick("max_position_embeddings", DEFAULT_MAX_POSITIONS),
        "rope_theta": float(spec.get("rope_theta") or rp.get("rope_theta") or DEFAULT_ROPE_THETA),
        "rope_scaling": rope_scaling(hf),
        "partial_rotary_factor": spec.get("rotary_dim", head_dim) / head_dim,
        "rms_norm_eps": float(pick("rms_norm_eps", DEFAULT_RMS_NORM_EPS)),
        "model_type": "llm",
        "edgellm_version": str(edgellm_version),
        "kv_cache_dtype": KV_CACHE_DTYPE,
    }
    scaling = cfg["rope_scaling"] or {}
    if scaling.get("rope_type") == "longrope":
        # The runtime computes longrope itself and reads this at the top level (collectRopeConfig).
        cfg["original_max_position_embeddings"] = int(
            scaling.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
            or cfg["max_position_embeddings"])
    if cfg["intermediate_size"] is None:
        log.warning("intermediate_size is known neither from the graph nor from config.json; writing null")
    if spec.get("sliding_window") is not None:  # beyond the contract's list, for runtimes that window
        cfg["sliding_window"] = spec["sliding_window"]
    return cfg


def write_config_json(cfg: dict, out_dir) -> Path:
    path = Path(out_dir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
