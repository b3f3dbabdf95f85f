"""Deployment features: optional changes to a rewritten graph (INT4 weights, FP8 KV cache, reduced vocabulary,
LoRA; VLM, implied by the input).

A feature is one module with one `Feature` object and, when the user selects it, one `FeatureOptions`
dataclass listed in `OPTIONS` below: its fields are options of `pipeline.Options` under the same (flat)
names, its `add_arguments` their command-line flags, its `validate` their checks and its `feature()` the
`Feature` it selects. Adding a feature = its module, its tests and one line in `OPTIONS`.

A feature declares, per target, what it emits and refuses targets that cannot express it; the pipeline
only runs the selected features' hooks in order:

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

from onnx_rewriter.analysis.moe import routers
from onnx_rewriter.features import eagle3, fp8_kv, int4, lora, reduced_vocab, wa_calibrate, wa_onnx_in, wa_quant
from onnx_rewriter.features.base import Feature, FeatureOptions
from onnx_rewriter.features.moe import Moe, MoeOptions
from onnx_rewriter.features.vlm import Vlm, is_mrope_graph

__all__ = ["OPTIONS", "Feature", "FeatureOptions", "implied", "selected"]


def selected(options) -> list[Feature]:
    """The features the options ask for, in the order their hooks run (the order of OPTIONS)."""
    return [o.feature(options) for o in (cls.of(options) for cls in OPTIONS) if o.enabled()]


def implied(run) -> list[Feature]:
    """Features the input itself needs, unless already selected: MatMulNBits / blocked DequantizeLinear
    weights need INT4; a [3, B, S] position_ids input (M-RoPE) is a VLM text decoder; other Q/DQ nodes are
    read as the contract's FP8 / INT8-SQ linears (wa_onnx_in.QdqOnnx) or refused."""
    out: list[Feature] = []
    if is_mrope_graph(run.source.graph):
        out.append(Vlm())
    if wa_onnx_in.qdq_nodes(run.source.graph):  # an already quantized export: its Q/DQ linears, emitted as ours
        out.append(wa_onnx_in.QdqOnnx())
    if routers(run.source.graph):  # a Mixture-of-Experts router (Softmax -> TopK): the blocks become MoE plugins
        out.append(Moe())
    if any(f.name == "int4" for f in run.features):
        return out
    if any(n.op == "MatMulNBits" or (n.op == "DequantizeLinear" and n.attrs.get("block_size"))
           for n in run.source.graph.nodes):
        out.append(int4.Int4())
    return out


# The registry: every user-selected feature's options, in the order its hooks run. LoRA comes after INT4:
# it attaches to the INT4 plugins too. W+A quantization (wa_quant) is selected by `export` for a ModelOpt FP8
# checkpoint (no flag yet).
OPTIONS: list[type[FeatureOptions]] = [
    int4.Int4Options,
    wa_quant.WaQuantOptions,
    wa_calibrate.WaCalibrateOptions,  # --quantize fp8 / nvfp4 / int8-sq from an fp16 model
    reduced_vocab.ReducedVocabOptions,
    lora.LoraOptions,
    fp8_kv.Fp8KvOptions,
    eagle3.Eagle3Options,  # last: it adds inputs to the plugins the others have finished
    MoeOptions,  # --moe-dense only: the Moe feature itself is implied by a router (implied())
]
