"""Deployment features: optional changes to a rewritten graph (INT4 weights, FP8 KV cache; later VLM, LoRA).

A feature is one module with one `Feature` object. It declares, per target, what it emits and refuses
targets that cannot express it; the pipeline only runs the selected features' hooks in order:

- `prepare(run)`        at the end of step_load: turn input-specific ops into what the patterns match;
- `check(run, target)`  in step_check, before anything is built: refuse (UnsupportedModel) or warn;
- `kept_inputs(run)`    in step_build: the export's own graph inputs the feature keeps (targets drop the rest);
- `apply(run, build)`   in step_build, right after the target built its plugin graph;
- `config(run, cfg)`    when config.json is made: the keys the feature adds or changes;
- `schemas()`           OpSchemas of the ops it emits (registered before the file is checked);
- `files(run, out_dir)` side files it writes beside model.onnx (returns their names).

Features read the target-agnostic matches (run.layers, run.ctx) and the graph; they never reach into a
target's code. `selected(options)` turns the options into the feature list (docs/architecture.md).
"""

from __future__ import annotations

from . import fp8_kv, int4, lora, reduced_vocab
from .base import Feature  # noqa: F401  (the features' base class, re-exported)
from .vlm import Vlm, is_mrope_graph


def selected(options) -> list[Feature]:
    """The features the options ask for, in the order their hooks run."""
    out: list[Feature] = []
    if getattr(options, "quantize", None):
        out.append(int4.from_options(options))
    if getattr(options, "reduce_vocab", False):
        out.append(reduced_vocab.from_options(options))
    if getattr(options, "lora", False):  # after INT4: LoRA attaches to the INT4 plugins too
        out.append(lora.Lora())
    if getattr(options, "kv_cache", "fp16") == "fp8":
        out.append(fp8_kv.from_options(options))
    return out


def implied(run) -> list[Feature]:
    """Features the input itself needs, unless already selected: MatMulNBits / blocked DequantizeLinear
    weights need INT4; a [3, B, S] position_ids input (M-RoPE) is a VLM text decoder."""
    out: list[Feature] = []
    if is_mrope_graph(run.source.graph):
        out.append(Vlm())
    if any(f.name == "int4" for f in run.features):
        return out
    if any(n.op == "MatMulNBits" or (n.op == "DequantizeLinear" and n.attrs.get("block_size"))
           for n in run.source.graph.nodes):
        out.append(int4.Int4())
    return out
