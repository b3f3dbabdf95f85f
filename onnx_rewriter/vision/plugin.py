"""ViTAttentionPlugin per target: domain, attributes, and its OpSchema (docs/contract.md, "Vision encoder").

Runtimes 0.4/0.5 (`edgellm-0.5`) have no ViT plugin; a target missing here is refused by name.
"""

from __future__ import annotations

import importlib

import onnx
from onnx.defs import OpSchema

from .. import targets
from ..errors import UnsupportedModel

OP = "ViTAttentionPlugin"
DOMAIN = "trt_edgellm"  # NVIDIA's 0.8+ exporters; the 0.6-0.9 runtimes look plugins up by op type only


def _attrs_09(num_heads: int, head_size: int, scale: float) -> dict:
    # attention_scale is read by the 0.9.1 creator only; older ones use 1/sqrt(D), so the rewrite refuses others.
    return {"num_heads": num_heads, "head_size": head_size, "attention_scale": scale}


def _attrs_011(num_heads: int, head_size: int, scale: float) -> dict:
    return {**_attrs_09(num_heads, head_size, scale), "qkv_scales": [1.0, 1.0, 1.0]}  # FP16 mode


# 0.10: the visual ONNX as 0.9 (contract 3 §17.5), and its creator reads attention_scale.
ATTRIBUTES = {"edgellm-0.9": _attrs_09, "edgellm-0.10": _attrs_09, "edgellm-0.11": _attrs_011}
DEFAULT_SCALE_ONLY = {"edgellm-0.9"}  # creators before runtime 0.9.1 ignore attention_scale: 1/sqrt(D) only


def check_target(target):
    """The Target (given as one, or by name for a direct call of the vision API), or a one-line refusal
    naming it (unknown names list the choices)."""
    if isinstance(target, str):
        target = targets.get(target)
    if target.name not in ATTRIBUTES:
        raise UnsupportedModel(f"target '{target.name}' cannot run a vision encoder: its runtime has no {OP} "
                               f"(vision encoders need {' or '.join(ATTRIBUTES)})")
    return target


def register_schema() -> None:
    """Idempotent OpSchema so onnx.checker accepts the file (TensorRT looks plugins up by op type)."""
    try:
        onnx.defs.get_schema(OP, 1, DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    importlib.import_module("onnx.reference.op_run")  # index the standard schemas before ours (modelio/schema.py)

    kinds = {"num_heads": OpSchema.AttrType.INT, "head_size": OpSchema.AttrType.INT,
             "attention_scale": OpSchema.AttrType.FLOAT, "qkv_scales": OpSchema.AttrType.FLOATS}
    names = ["q", "k", "v", "cu_seqlens", "max_seqlen_carrier"]
    onnx.defs.register_schema(OpSchema(
        OP, DOMAIN, 1, doc="EdgeLLM bidirectional attention within cu_seqlens segments (TensorRT plugin).",
        inputs=[OpSchema.FormalParameter(n, f"T{i}") for i, n in enumerate(names)],
        outputs=[OpSchema.FormalParameter("output", "T0")],
        type_constraints=[(f"T{i}", ["tensor(float16)", "tensor(float)", "tensor(int32)", "tensor(float8e4m3fn)"],
                           "") for i in range(len(names))],
        attributes=[OpSchema.Attribute(n, k, "", required=n in ("num_heads", "head_size")) for n, k in kinds.items()]))
