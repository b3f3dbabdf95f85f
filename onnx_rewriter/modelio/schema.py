"""An OpSchema for AttentionPlugin, so onnx.checker (full check) and shape inference accept the file.

TensorRT looks plugins up by op_type only; the schema exists for ONNX tooling, never as a function.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

DOMAINS = ("trt", "trt_edgellm")

_INT, _FLOAT, _FLOATS, _STRING = (OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT, OpSchema.AttrType.FLOATS,
                                  OpSchema.AttrType.STRING)
ATTRIBUTES = {
    "num_q_heads": _INT, "num_kv_heads": _INT, "head_size": _INT, "enable_tree_attention": _INT,
    "enable_fp8_kv_cache": _INT, "sliding_window_size": _INT, "qkv_scales": _FLOATS, "attention_scale": _FLOAT,
    "enable_context_mask_selector": _INT, "enable_vision_block_attention": _INT, "skip_softmax_scale_factor": _FLOAT,
    "rms_norm_eps": _FLOAT, "enable_qk_norm": _INT, "qk_norm_post_rope": _INT, "enable_kv_shared": _INT,
    "enable_attention_sink": _INT, "enable_contiguous_query_swa": _INT, "plugin_version": _STRING,
}

_registered = False


def register() -> None:
    """Idempotent: registers the schema once per process for both domains."""
    global _registered
    if _registered:
        return
    # onnx.reference indexes schemas by bare name on first import and rejects one name in two
    # domains; importing it first keeps ReferenceEvaluator usable after registration.
    import onnx.reference.op_run  # noqa: F401
    types = [f"tensor({t})" for t in ("float", "float16", "bfloat16", "float8e4m3fn", "int32", "int64", "int8",
                                                 "uint8", "bool")]
    for domain in DOMAINS:
        try:
            onnx.defs.get_schema("AttentionPlugin", 1, domain)
            continue
        except onnx.defs.SchemaError:
            pass
        schema = OpSchema(
            "AttentionPlugin", domain, 1,
            doc="EdgeLLM attention with RoPE and KV cache (TensorRT plugin).",
            inputs=[OpSchema.FormalParameter("inputs", "T", param_option=OpSchema.FormalParameterOption.Variadic,
                                             is_homogeneous=False, min_arity=1)],
            outputs=[OpSchema.FormalParameter("outputs", "T", param_option=OpSchema.FormalParameterOption.Variadic,
                                              is_homogeneous=False, min_arity=1)],
            type_constraints=[("T", types, "any tensor type")],
            attributes=[OpSchema.Attribute(name, kind, "", required=False) for name, kind in ATTRIBUTES.items()],
        )
        onnx.defs.register_schema(schema)
    _registered = True


def register_op(name: str, inputs: list[str], outputs: list[str], attributes: dict, doc: str = "") -> None:
    """Register a schema for another plugin op `name` in both domains (idempotent), at version 1 like
    AttentionPlugin: the output declares each custom domain at opset 1. Every input and output gets its own
    type variable (the plugins mix fp16 activations with int8 weights)."""
    register()
    types = [f"tensor({t})" for t in ("float", "float16", "bfloat16", "float8e4m3fn", "int32", "int64", "int8",
                                                 "uint8", "bool")]
    for domain in DOMAINS:
        try:
            onnx.defs.get_schema(name, 1, domain)
            continue
        except onnx.defs.SchemaError:
            pass
        params = [(n, f"T{k}") for k, n in enumerate(inputs + outputs)]
        onnx.defs.register_schema(OpSchema(
            name, domain, 1, doc=doc or f"EdgeLLM {name} (TensorRT plugin).",
            inputs=[OpSchema.FormalParameter(n, t) for n, t in params[:len(inputs)]],
            outputs=[OpSchema.FormalParameter(n, t) for n, t in params[len(inputs):]],
            type_constraints=[(t, types, "") for _, t in params],
            attributes=[OpSchema.Attribute(a, kind, "", required=True) for a, kind in attributes.items()]))
