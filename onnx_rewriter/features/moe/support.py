"""Which MoE plugin each target's runtime has, and the one-line refusals of MoE models read off their config.json
(contract part 3 §15.1, §15.6; docs/contract.md, "Mixture-of-Experts decoders").

What is written: one Fp16MoePlugin per routed block with 128 or 256 experts (edgellm-0.10 / 0.11; 0.9 with a warning
naming runtime 0.9.1), Int4MoePlugin with --quantize int4 or from a GPTQ checkpoint (any expert count), the
plugin-free form with --moe-dense (features/moe/__init__.py, which checks the blocks the pattern read).
Before anything is loaded or matched, a
config.json is refused with the most specific reason that applies:

1. models no EdgeLLM plugin can run at all: GPT-OSS (expert biases), DeepSeek-V2/V3 / Kimi (MLA attention);
2. FP8 / INT8 expert checkpoints (no MoE plugin reads them);
3. `edgellm-0.5` (runtimes 0.4/0.5 have no MoE plugin);
4. (``generic``, the export route) any other MoE decoder that is not what is written today: not supported yet,
   naming E and k.

``refusal(config, target)`` reads an HF config (a dict; a VLM's ``text_config`` included) and returns that line
or None; ``graph_refusal`` words the refusal of a router found in a graph that the moe_block pattern did not read.
"""

from __future__ import annotations

# Plugins per target name (contract §15.1). edgellm-0.9 covers runtimes 0.6-0.9.x: Int4MoePlugin on all of them,
# Fp16MoePlugin only on 0.9.1 (a warning would have to say so).
PLUGINS = {
    "edgellm-0.5": (),
    "edgellm-0.9": ("Int4MoePlugin", "Fp16MoePlugin (runtime 0.9.1 only)"),
    "edgellm-0.10": ("Int4MoePlugin", "Fp16MoePlugin"),
    "edgellm-0.11": ("Int4MoePlugin", "Fp16MoePlugin"),
}
FP16_EXPERT_COUNTS = (128, 256)  # Fp16MoePlugin's validateAttributes
# What onnx_rewriter writes as Fp16MoePlugin, per target: the expert counts it takes.
WRITTEN = {"edgellm-0.9": FP16_EXPERT_COUNTS, "edgellm-0.10": FP16_EXPERT_COUNTS,
           "edgellm-0.11": FP16_EXPERT_COUNTS}  # 0.9: with a warning naming runtime 0.9.1
INT4_WRITTEN = ("edgellm-0.9", "edgellm-0.10", "edgellm-0.11")  # Int4MoePlugin with --quantize int4 (RTN experts)

_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOPK_KEYS = ("num_experts_per_tok", "moe_topk", "top_k")
_MLA_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2", "kimi_vl")
_WA_METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors", "compressed_tensors", "w8a8", "smoothquant")

NOT_YET = ("no MoE plugin takes these FP16 experts: onnx_rewriter writes MoE layers as Fp16MoePlugin (edgellm-0.10 / "
           "0.11; 0.9 for runtime 0.9.1) with 128 or 256 experts, top-k <= 8, or with --quantize int4 (or from a GPTQ "
           "checkpoint) as Int4MoePlugin on edgellm-0.9 / 0.10 / 0.11 with any expert count; --moe-dense writes the "
           "plugin-free form (every expert computed, E/k times the expert compute)")


def _llm(config: dict) -> dict:
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else dict(config)


def _first(cfg: dict, keys):
    for k in keys:
        v = cfg.get(k)
        if v is not None:
            return v
    return None


def experts(config: dict) -> tuple[int, int | None] | None:
    """(E, k) of an MoE config, None for a dense one (no expert count, 0 experts, or every layer dense)."""
    cfg = _llm(config)
    e = _first(cfg, _EXPERT_KEYS)
    if not isinstance(e, int) or isinstance(e, bool) or e <= 0:
        return None
    layers, dense = cfg.get("num_hidden_layers"), cfg.get("mlp_only_layers") or []
    if isinstance(layers, int) and isinstance(dense, list) and layers and set(range(layers)) <= set(dense):
        return None
    k = _first(cfg, _TOPK_KEYS)
    return e, k if isinstance(k, int) else None


def _quant(cfg: dict) -> str | None:
    """The quantization of an FP8 / INT8 checkpoint ('fp8', 'int8 ...'), or None."""
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = str(qc.get("quant_method", "")).lower()
    algo = str(qc.get("quant_algo", "")).upper()
    if method == "modelopt" and ("FP8" in algo or "INT8" in algo):
        return f"ModelOpt {algo}"
    if method in _WA_METHODS:
        text = str(qc).lower()
        kind = "FP8" if "fp8" in method or "float" in text or "fp8" in text else "INT8"
        return f"{kind} ({method})"
    bits = qc.get("bits", qc.get("w_bit"))
    if method in ("gptq", "awq") and isinstance(bits, int) and bits == 8:
        return f"INT8 ({method}, 8 bits)"
    return None


def int4_checkpoint(config: dict) -> bool:
    """An AutoAWQ / GPTQ 4-bit checkpoint: `export` writes its experts' own codes into Int4MoePlugin."""
    qc = _llm(config).get("quantization_config") if isinstance(config, dict) else None
    return (isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() in ("awq", "gptq")
            and qc.get("bits", qc.get("w_bit", 4)) == 4)


def _what(cfg: dict, e: int, k: int | None) -> str:
    return f"{cfg.get('model_type') or 'MoE'}: {e} experts, top-{k if k is not None else '?'}"


def refusal(config: dict, target: str | None = None, generic: bool = True, int4: bool = False,
            dense: bool = False) -> str | None:
    """The one-line reason an MoE model is refused (most specific first), or None for a dense model.
    generic=False: only the model-specific reasons (1-3 above), not 'not supported yet'; int4: --quantize int4
    (Int4MoePlugin, any expert count, on the targets of INT4_WRITTEN); dense: --moe-dense (no plugin, same targets)."""
    if not isinstance(config, dict):
        return None
    cfg = _llm(config)
    mtype = str(cfg.get("model_type") or "")
    if mtype in _MLA_TYPES or cfg.get("kv_lora_rank"):
        return (f"DeepSeek-V2/V3-style model ({mtype or 'kv_lora_rank set'}): its multi-head latent attention "
                f"(MLA) has no EdgeLLM attention plugin and its sigmoid group routing no MoE plugin mapping; "
                f"it cannot be written")
    found = experts(config)
    if mtype == "gpt_oss":
        return (f"GPT-OSS Mixture-of-Experts model ({_what(cfg, *found) if found else mtype}): its experts have "
                f"biases, a clamped SwiGLU and interleaved gate/up rows, and no EdgeLLM MoE plugin takes expert "
                f"biases; it cannot be written")
    if found is None:
        return None
    what = _what(cfg, *found)
    quant = _quant(cfg)
    if quant:
        return (f"Mixture-of-Experts model ({what}) with {quant} expert weights: no EdgeLLM MoE plugin reads FP8 or "
                f"INT8 experts (Int4MoePlugin: INT4 Marlin, Fp16MoePlugin: fp16, NVFP4 plugins: FP4)")
    if target is not None and not PLUGINS.get(str(target), ("?",)):
        return (f"Mixture-of-Experts model ({what}) cannot be written for {target}: runtimes 0.4/0.5 have no MoE "
                f"plugin (Int4MoePlugin from runtime 0.6, Fp16MoePlugin from 0.9.1)")
    e, k = found
    if not generic or ((int4 or dense) and str(target) in INT4_WRITTEN) or (e in WRITTEN.get(str(target), ())
                                                                  and (k is None or k <= 8)):
        return None  # the rewrite reads the blocks and checks the rest (features/moe)
    return f"Mixture-of-Experts model ({what}): {NOT_YET}"


def graph_refusal(layer: int, softmax: str, topk: str, e: int | None, k: int | None, target: str | None = None,
                  why_not: str | None = None) -> str:
    """The refusal of a router found in a graph whose block the moe_block pattern did not read (`why_not`)."""
    shape = f"; not a routed block onnx_rewriter reads: {why_not}" if why_not else ""
    where = (f"layer {layer}: a Mixture-of-Experts router (Softmax '{softmax}' -> TopK '{topk}', "
             f"{e if e else '?'} experts, top-{k if k else '?'}{shape})")
    if target is not None and not PLUGINS.get(str(target), ("?",)):
        return f"{where} cannot be written for {target}: runtimes 0.4/0.5 have no MoE plugin"
    return f"{where}: MoE decoders are {NOT_YET}"
