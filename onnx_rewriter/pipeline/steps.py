"""The rewrite as a short list of named steps: load, normalize, match, check, build, write.

`rewrite()` is the public entry point (the CLI is a thin shell around it). Each step is a function of
the `Run` state so a caller can run, replace or inspect steps without reaching into internals.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_rewriter import progress, projections, safety, targets
from onnx_rewriter.analysis import constants as exact
from onnx_rewriter.analysis import dims as specmod
from onnx_rewriter.analysis import moe as moe_graph
from onnx_rewriter.analysis.mask_probe import MaskProbe
from onnx_rewriter.errors import PatternMismatch, RewriteError, UnsupportedModel
from onnx_rewriter.features import OPTIONS as FEATURE_OPTIONS
from onnx_rewriter.features import implied, selected
from onnx_rewriter.features.moe import support as moe_support
from onnx_rewriter.linear_names import name_linears
from onnx_rewriter.matching import engine
from onnx_rewriter.matching.results import AttentionLayer, TokenEmbedding
from onnx_rewriter.modelio import dtype as dtypes
from onnx_rewriter.modelio import graph as graphio
from onnx_rewriter.modelio import schema, stream
from onnx_rewriter.modelio.config_file import read_config
from onnx_rewriter.modelio.normalize import normalize, replace_uses
from onnx_rewriter.modelio.output import OutputDir
from onnx_rewriter.patterns import STAGES, load_patterns
from onnx_rewriter.pipeline.report import LayerReport, Report
from onnx_rewriter.sidefiles import config_json, tokenizer_job, writer
from onnx_rewriter.sidefiles.config_json import make_config_json
from onnx_rewriter.targets.base import B, Build, S, lm_head_input

log = logging.getLogger(__name__)

ANCHOR_STAGE = "attention_layer"
DROPPED_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass
class CoreOptions:
    """The options every rewrite has; `Options` adds each feature's (features.OPTIONS) under flat names."""

    target: str | targets.Target = targets.DEFAULT  # given by name; the Target object once constructed
    dtype: str = "float16"
    config: str | Path | None = None  # an HF config.json to cross-check and complete ours
    tokenizer: str | Path | None = None  # a folder with the tokenizer; default: beside the input
    external_data: bool | None = None  # None: only when the weights pass 2 GB
    force: bool = False  # replace an earlier output of this tool (never a folder it did not write)
    self_check: bool = True  # numerically check masks before fusing
    no_tokenizer: bool = False  # write no tokenizer files (with a warning) instead of requiring them
    trust_remote_code: bool = False  # let transformers run a model folder's own code (a custom tokenizer)
    report: str | Path | None = None  # where the caller writes the match report: checked with the other paths
    fuse_qkv: bool = True  # q/k/v projections as one MatMul (projections.py; FP16 linears: off with INT4, LoRA)
    calibration: str | Path | None = None  # prompts (one a line) for calibrated scales (AWQ, FP8 KV); None: bundled

    def __post_init__(self):
        self.resolve_target()

    def resolve_target(self) -> None:
        """The one place a target name becomes its Target (an unknown name lists the known ones)."""
        if not isinstance(self.target, targets.Target):
            self.target = targets.get(self.target)


def _options_class() -> type:
    """CoreOptions plus the fields of every feature's options dataclass, flat: `rewrite(..., quantize="int4")`."""
    fields, owner = [], {f.name: "CoreOptions" for f in dataclasses.fields(CoreOptions)}
    for cls in FEATURE_OPTIONS:
        for f in dataclasses.fields(cls):
            if f.name in owner:
                raise TypeError(f"option '{f.name}' of {cls.__name__} is already one of {owner[f.name]}")
            owner[f.name] = cls.__name__
            fields.append((f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                             metadata=f.metadata)))
    cls = dataclasses.make_dataclass("Options", fields, bases=(CoreOptions,))
    cls.__module__, cls.__doc__ = __name__, "CoreOptions plus every feature's options (features.OPTIONS), flat."
    return cls


Options = _options_class()


def make_options(options: Options | None = None, **kwargs) -> Options:
    """Options from keyword arguments, every value checked: a typo fails here, before any work. The target
    name becomes its Target object here, once; everything downstream receives that object."""
    if options is None:
        known = sorted(f.name for f in dataclasses.fields(Options))
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise RewriteError(f"unknown option '{unknown[0]}'; the options are: {', '.join(known)}")
        options = Options(**kwargs)
    elif kwargs:
        raise RewriteError(f"pass either options= or keyword options, not both ({', '.join(sorted(kwargs))})")
    options.resolve_target()  # set to a name after construction: resolve it now
    if options.dtype not in dtypes.NAMES:
        raise RewriteError(f"unknown --dtype '{options.dtype}'; choose {' or '.join(dtypes.NAMES)}")
    if options.config is not None and not Path(options.config).is_file():
        raise RewriteError(f"--config '{options.config}' is not a file; give the path of a config.json")
    if options.calibration is not None and not Path(options.calibration).is_file():
        raise RewriteError(f"--calibration '{options.calibration}' is not a file; give a text file, one prompt a line")
    if options.tokenizer is not None and not Path(options.tokenizer).is_dir():
        raise RewriteError(f"--tokenizer '{options.tokenizer}' is not a folder; give the folder holding "
                           f"tokenizer.json (or pass --no-tokenizer)")
    for cls in FEATURE_OPTIONS:
        feature = cls.of(options)
        feature.validate(options.target, options)
        if feature.enabled():
            feature.imply(options)
    return options


def read_paths(options: Options) -> dict:
    """{label: path} of every file or folder the options name for reading: nothing written may be or contain
    one of them (safety.check_writes)."""
    paths = {"the --config file": options.config, "the --tokenizer folder": options.tokenizer,
             "the --calibration file": options.calibration, "the --kv-scales folder": options.kv_scales,
             "the --keep-tokens file": options.keep_tokens}
    if isinstance(options.eagle_draft, (str, Path)):
        paths["the --eagle-draft folder"] = options.eagle_draft
    for i, f in enumerate(options.vocab_corpus or []):
        paths[f"the --vocab-corpus file '{f}'" if i else "the --vocab-corpus file"] = f
    return paths


def check_used(options: Options) -> None:
    """An option that would change nothing is refused, not silently ignored (after `export` has set what a
    quantized checkpoint implies: its INT4 codes)."""
    if isinstance(options.eagle_draft, (str, Path)):
        raise RewriteError(f"--eagle-draft '{options.eagle_draft}': a folder is for export (the draft checkpoint); a "
                           f"rewrite of a draft's plain export takes --eagle-draft without a value")
    if options.int4_plugin_version is not None and options.quantize != "int4":
        raise RewriteError(f"--int4-plugin-version {options.int4_plugin_version} needs --quantize int4 "
                           f"(or an AWQ/GPTQ checkpoint); drop it or add --quantize int4")
    if options.calibration is not None:
        kv = options.kv_cache == "fp8" and options.kv_scales is None
        awq = options.quantize == "int4" and options.int4_method == "awq"
        wa = options.quantize in ("fp8", "nvfp4", "int8-sq") and not options.wa_checkpoint
        if not (kv or awq or wa):
            why = " (its scales come from --kv-scales)" if options.kv_cache == "fp8" else ""
            raise RewriteError(f"--calibration '{options.calibration}' is used only to calibrate --kv-cache fp8 "
                               f"scales, --int4-method awq or --quantize fp8/nvfp4/int8-sq; nothing here "
                               f"calibrates{why}: drop --calibration")


def check_paths(in_path: Path, out_dir: Path, options: Options) -> None:
    """The output may replace neither what we read nor a folder we did not write (safety.py)."""
    # `rewrite model.onnx out` in the model's folder is the common case: an output inside the input's
    # folder destroys nothing; being or containing it would.
    read = {"the input model's folder": Path(in_path).parent, "the input model": Path(in_path), **read_paths(options)}
    safety.check_writes(out_dir, options.force, read=read, report=options.report)


@dataclass
class Run:
    """State passed from step to step."""

    in_path: Path
    out_dir: Path | None
    options: Options
    report: Report = field(default_factory=Report)
    source: graphio.SourceModel | None = None
    ctx: engine.Context | None = None
    layers: list[AttentionLayer] = field(default_factory=list)
    embedding: TokenEmbedding | None = None
    inputs_embeds: gs.Variable | None = None
    logits: gs.Tensor | None = None
    spec: dict = field(default_factory=dict)
    hf_config: dict | None = None
    files: list[str] = field(default_factory=list)
    tokenizer_job: object | None = None  # tokenizer side files being written (sidefiles/tokenizer_job.py)
    narrow: set = field(default_factory=set)  # weights the writer converts to the output float type
    weights_float_type: int = onnx.TensorProto.FLOAT  # the input's weights: how finely its constants are rounded
    features: list = field(default_factory=list)  # features.Feature objects, their hooks run in order
    min_opset: int = 0  # a feature's nodes need at least this opset (FLOAT4E2M1 weights on edgellm-0.9: 23)

    def warn(self, msg: str) -> None:
        self.report.warnings.append(msg)
        log.warning(msg)


def step_load(run: Run) -> None:
    run.source = graphio.load(run.in_path)
    run.weights_float_type = weights_float_type(run.source.graph)

    run.features += implied(run)
    for feature in run.features:
        feature.prepare(run)
    cfg = run.options.config or (run.in_path.parent / "config.json")
    if run.options.config or Path(cfg).is_file():
        run.hf_config = read_config(cfg, fix="give an HF config.json (an object with hidden_size, "
                                              "num_hidden_layers, ...)")


def weights_float_type(graph: gs.Graph) -> int:
    """The float type most weight elements have (before bf16 is widened): how finely the graph's constants
    were rounded. Read once at load; analysis/constants.py snaps within that rounding."""
    from collections import Counter

    counts = Counter()
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            proto = graphio.lazy_proto(t)
            code = proto.data_type if proto is not None else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
            counts[code] += int(np.prod(t.shape)) if t.shape else 1
    floats = [(n, code) for code, n in counts.items() if code in graphio.FLOAT_TYPES]
    return max(floats)[1] if floats else onnx.TensorProto.FLOAT


# onnxruntime's contrib ops the rewriter reads (converted before matching); any other op of these domains, or
# one the ONNX standard does not define (ORT registers SimplifiedLayerNormalization in the default domain), is
# an onnxruntime fusion (optimize_model: RotaryEmbedding, GroupQueryAttention, SkipSimplifiedLayerNormalization,
# ...) that hides the layer structure the patterns read.
READ_CONTRIB_OPS = {"MatMulNBits"}
ORT_DOMAINS = ("com.microsoft", "com.microsoft.nchwc", "ai.onnx.contrib")


def check_ort_fused_ops(run: Run) -> None:
    """Refuse onnxruntime-fused graphs by op name (inspect and rewrite both run this, in step_normalize)."""
    fused = {}
    for node in run.source.graph.nodes:
        if (node.domain in ORT_DOMAINS and node.op not in READ_CONTRIB_OPS
                or node.domain in ("", "ai.onnx", None) and not onnx.defs.has(node.op)):
            fused.setdefault(node.op, node.name)
    if fused:
        ops = ", ".join(f"{op} ('{name}')" for op, name in sorted(fused.items()))
        raise UnsupportedModel(f"'{run.in_path}' holds onnxruntime-fused (non-standard) ops ({ops}): the rewriter "
                               f"reads the plain export; rewrite the export from before onnxruntime's optimize_model "
                               f"(or export again)")


def step_normalize(run: Run) -> None:
    check_ort_fused_ops(run)
    run.source.graph = normalize(run.source.graph, reinfer=True, weight_transposes=True)


def check_moe(run: Run, ctx: engine.Context | None = None) -> None:
    """Refuse a Mixture-of-Experts model by name (none is written yet). Before matching (`ctx` None): the reasons
    its config.json gives (GPT-OSS, MLA, FP8/INT8 experts, edgellm-0.5). After: each router in the graph (a Softmax
    read by a TopK, which would otherwise be reported as an attention layer that does not match), with what the
    moe_block pattern read there or why it did not match; a config.json saying MoE without any router in the graph
    is refused too."""
    target = str(run.options.target)
    if ctx is None:
        why = moe_support.refusal(run.hf_config, target, generic=False) if run.hf_config is not None else None
    else:
        found = moe_graph.routers(run.source.graph)
        nodes = {n.name: n for n in run.source.graph.nodes}
        unread = [r for r in found if ctx.anchor_match("moe", nodes[r.topk]) is None]
        why = None
        if unread:  # the blocks the pattern read go on to the moe feature, which refuses what it cannot write
            r = unread[0]
            misses = "; ".join(x.describe() for x in ctx.anchor_misses("moe", nodes[r.topk]))
            why = moe_support.graph_refusal(r.layer, r.softmax, r.topk, r.experts, r.top_k, target,
                                            why_not=misses or "not recognized")
            if len(unread) > 1:
                why += f" (and {len(unread) - 1} more layers)"
        elif not found and run.hf_config is not None:
            why = moe_support.refusal(run.hf_config, target)
    if why is not None:
        raise UnsupportedModel(why)


def step_match(run: Run) -> None:
    g = run.source.graph
    check_moe(run)
    try:
        run.ctx = engine.run(g, list(STAGES), load_patterns(), info={"opset": run.source.opset})
    except engine.Refuse as exc:
        raise UnsupportedModel(f"{exc.reason}{exc.where()}") from None
    check_moe(run, run.ctx)
    router_softmax = {r.softmax for r in moe_graph.routers(g)}  # MoE routers are not attention
    anchors = [n for n in g.nodes if n.op in ("Softmax", "Attention") and n.name not in router_softmax]
    if not anchors:
        raise RewriteError("no attention found in the graph (no Softmax or Attention node); "
                           "is this a decoder LLM export?")
    for i, node in enumerate(anchors):
        m = run.ctx.anchor_match(ANCHOR_STAGE, node)
        if m is None:
            why = "; ".join(x.describe() for x in run.ctx.anchor_misses(ANCHOR_STAGE, node))
            run.report.layers.append(LayerReport(i, False, [], why or "not recognized"))
            continue
        layer = m.result
        layer.index = i
        run.layers.append(layer)
        run.report.layers.append(LayerReport(i, True, layer.patterns, None))
    bad = [l for l in run.report.layers if not l.rewritten]
    if bad:
        raise PatternMismatch(f"layer {bad[0].index} does not match: {bad[0].reason}"
                              + (f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""))


def step_embedding(run: Run) -> None:
    """Replace the token-embedding Gather by the `inputs_embeds` graph input."""
    g = run.source.graph
    found = [m for m in run.ctx.matches.get("embedding", {}).values()]
    found = [m for m in found if m.result.ids.name == "input_ids"] or found
    if len(found) != 1:
        raise RewriteError(f"expected one token-embedding Gather on input_ids, found {len(found)}")
    m = found[0]
    weight = m.result.weight
    lazy = graphio.lazy_proto(weight)
    vocab, hidden = (int(x) for x in lazy.dims) if lazy is not None else weight.shape
    emb = gs.Variable("inputs_embeds", dtype=m.out.dtype or np.float32, shape=[B, S, int(hidden)])
    g.inputs.append(emb)
    replace_uses(g, m.out, emb)
    m.anchor.outputs.clear()
    # Sequence and batch sizes used to come from Shape(input_ids / attention_mask): read them off
    # inputs_embeds' first two dims instead.
    for node in list(g.nodes):
        if node.op == "Shape" and node.inputs[0].name in DROPPED_INPUTS:
            end = node.attrs.get("end")
            if len(node.inputs[0].shape or ()) == 3:  # M-RoPE position_ids [3, B, S]: dims 1, 2 are B, S
                node.attrs["start"] = max(node.attrs.get("start", 0) - 1, 0)
                end = None if end is None else end - 1
            node.attrs["end"] = 2 if end is None or end > 2 else end
            node.inputs[0] = emb
    run.embedding = m.result
    run.inputs_embeds = emb
    outs = [t for t in g.outputs if t.name == "logits"] or g.outputs[:1]
    run.logits = outs[0]
    # The MLP width is read off the weights only when no config.json says it (it is a heuristic).
    run.spec = specmod.model_spec(run.layers, vocab_size=vocab, hidden_size=hidden,
                                  graph=g if run.hf_config is None else None)


def step_check(run: Run) -> None:
    """Numbers before fusing: what the mask computes (causal? window?), and what the config says."""
    if run.options.self_check:
        probe = MaskProbe(run.source.graph, run.source.base_dir)
        for layer in run.layers:
            layer.sliding_window = probe.window_of(layer)
        run.spec = specmod.model_spec(run.layers, run.spec["vocab_size"], run.spec["hidden_size"],
                                      run.source.graph if run.hf_config is None else None)

    if run.hf_config is not None:
        config_json.cross_check(run.spec, run.hf_config)
    if not run.options.no_tokenizer:  # the tokenizer's ids fit the embedding (checked again on the files written)
        tok_dir = writer.tokenizer_dir(run)
        writer.check_tokenizer_rows(tok_dir / "tokenizer.json", tok_dir, int(run.spec["vocab_size"]))
    exact_constants(run)
    target = run.options.target
    target.check(run.layers, run.warn)
    for feature in run.features:
        feature.check(run, target)


def exact_constants(run: Run) -> None:
    """rope_theta and softmax scales as the checkpoint states them, not as rounded constants read back
    (analysis/constants.py); the report's `snapped` lists each value written in place of the graph's."""
    ref = specmod.runtime_rope_layer(run.layers)
    theta, note = exact.snap_theta(ref.rope.inv_freq, ref.rotary_dim, config_json.rope_thetas(run.hf_config))
    run.spec["rope_theta"] = theta
    notes = [note]
    scales = exact.config_scales(run.hf_config)
    for layer in run.layers:
        layer.scale, note = exact.snap_scale(layer.scale, layer.head_size, run.weights_float_type, scales)
        notes.append(note)
    for note in dict.fromkeys(n for n in notes if n):  # one line for all layers that snapped alike
        run.report.snapped.append(note)
        log.info("%s", note)


def step_build(run: Run) -> None:
    target = run.options.target
    float_type = dtypes.NAMES[run.options.dtype]
    g = run.source.graph
    # Before the dtype pass, which drops the inferred shapes the view checks read. INT4 and W+A quantization keep
    # q/k/v apart.
    fuse = run.options.fuse_qkv and not any(f.name in ("int4", "wa_quant") for f in run.features)
    unfused = projections.prepare(g, run.layers, fuse)
    for layer in run.report.layers:  # like a pattern's miss, every fusion not done says why
        layer.qkv_unfused = unfused.get(layer.index)
        if layer.qkv_unfused:
            log.debug("layer %d: q/k/v not fused: %s", layer.index, layer.qkv_unfused)
    run.narrow = dtypes.convert_graph(g, float_type)
    if float_type == onnx.TensorProto.FLOAT16:
        dtypes.keep_fp32(g, [m.result for m in run.ctx.matches.get("rms_norm", {}).values()])

    # path-style linear names, as NVIDIA's insert-lora tool needs them (linear_names.py)
    names = name_linears(g, run.source.module_paths, lm_head_input(run.logits)[0])
    log.debug("linear names: %s", names)

    for layer in run.layers:  # Shape side branches must not keep the removed RoPE / attention alive
        for gone, same in layer.same_shape:
            for node in [n for n in gone.outputs if n.op == "Shape"]:
                node.inputs[0] = same
    # The table the runtime will build from the config.json written beside the graph: layers whose own
    # table differs from it get theirs baked in (targets.base.rope_input).
    cfg = make_config_json(run.spec, run.hf_config, target.edgellm_version)
    positions = cfg["max_position_embeddings"]
    build = Build(graph=g, layers=run.layers, inputs_embeds=run.inputs_embeds, logits=run.logits,
                  float_type=float_type, opset=run.source.opset, rope_positions=positions,
                  runtime_config=cfg,
                  kept_inputs=tuple(t for f in run.features for t in f.kept_inputs(run)))
    target.build(build)
    for feature in run.features:
        feature.apply(run, build)
    baked = [t for name, t in g.tensors().items()
             if name.startswith("rope_rotary_cos_sin_layer") and isinstance(t, gs.Constant)]
    if baked:
        mib = sum(t.values.nbytes for t in baked) / 2**20
        run.report.snapped.append(f"RoPE table baked into the graph for {len(baked)} distinct table(s) the runtime "
                                  f"cannot build from config.json: {positions} positions, {mib:.2f} MiB")
    g.cleanup()
    normalize(g)
    router_softmax = {r.softmax for r in moe_graph.routers(g)}  # Int4MoePlugin's top-k mass (features/moe)
    leftovers = sorted({n.op for n in g.nodes if n.op in ("Softmax", "Cos", "Sin", "Attention", "RotaryEmbedding")
                        and n.name not in router_softmax})
    if leftovers:
        raise RewriteError(f"after the rewrite the graph still has {', '.join(leftovers)} nodes; refusing to "
                           f"write a graph that was only partly understood")


def to_model(run: Run) -> onnx.ModelProto:
    target = run.options.target
    g = run.source.graph
    opset = max(target.opset or run.source.opset, run.min_opset)
    model = gs.export_onnx(g, do_type_check=False)
    del model.opset_import[:]
    model.opset_import.extend([onnx.helper.make_opsetid("", opset), onnx.helper.make_opsetid(target.domain, 1)])
    # other custom domains the nodes use (trt:: TensorRT parser ops of NVFP4 on the trt_edgellm targets)
    model.opset_import.extend(onnx.helper.make_opsetid(d, 1) for d in
                              sorted({n.domain for n in model.graph.node} - {"", "ai.onnx", target.domain}))
    # The lowest IR version that may declare these opsets (opset 24 needs IR 12), never below the input's.
    model.ir_version = max(run.source.ir_version,
                           onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
    model.producer_name = "onnx_rewriter"
    # Keep types only where inference cannot derive them: the plugin outputs (no inference function).
    plugin_outs = {o for n in model.graph.node if n.domain in schema.DOMAINS for o in n.output}
    keep = [vi for vi in model.graph.value_info if vi.name in plugin_outs]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    return model


def step_write(run: Run) -> None:
    schema.register()
    for feature in run.features:
        for args in feature.schemas():
            schema.register_op(*args)
    float_type = dtypes.NAMES[run.options.dtype]
    size = graphio.weights_nbytes(run.source.graph, 2 if float_type == onnx.TensorProto.FLOAT16 else 4)
    external = run.options.external_data if run.options.external_data is not None else size > 2_000_000_000
    model = to_model(run)
    # asked for: every weight but norms and biases in the data file (none passes the automatic size in a small model)
    least = graphio.EXPLICIT_EXTERNAL_MIN if run.options.external_data else graphio.SMALL_TENSOR_ELEMENTS
    with OutputDir(run.out_dir, force=run.options.force) as tmp:
        run.files = graphio.save(model, tmp / "model.onnx", run.source.base_dir, float_type, external, run.narrow,
                                 least)
        graphio.check(tmp / "model.onnx")  # onnx.checker, without re-reading inline weights
        run.files += writer.write_side_files(run, tmp)
        _warn_nonfinite(run, stream.take_nonfinite())
        if run.options.external_data and not any(f.endswith(".onnx.data") for f in run.files):
            run.warn(f"--external-data: no weight has more than {graphio.EXPLICIT_EXTERNAL_MIN} values, so all stay "
                     f"inside model.onnx; no model.onnx.data was written")


def _warn_nonfinite(run: Run, bad: dict) -> None:
    """Weights that are NaN, or outside fp16's range (|x| > 65504: saturated or inf once narrowed), said by
    name rather than written silently; verify then fails on the numbers."""
    cases = (("nan", "are NaN", "the model will compute NaN: check the checkpoint"),
             ("range", "lie outside fp16's range (|x| >= 65504: saturated or inf in the output)",
              "the output's values differ from the checkpoint's: check it, or write --dtype float32"))
    for kind, what, fix in cases:
        names = sorted(n for n, k in bad.items() if kind in k)
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            run.warn(f"values of {len(names)} weight(s) {what}: {shown}; {fix}")


STEPS = [step_load, step_normalize, step_match, step_embedding, step_check, step_build, step_write]


def rewrite(in_path, out_dir, options: Options | None = None, steps=None, **kwargs) -> Run:
    """Rewrite a baseline ONNX export into an EdgeLLM folder. Returns the run (files, report, spec)."""
    options = make_options(options, **kwargs)
    run = Run(in_path=Path(in_path), out_dir=safety.resolved(out_dir) if out_dir is not None else None,
              options=options)

    run.features = selected(options)  # an unknown feature option too
    check_used(options)
    stream.take_nonfinite()  # what an earlier run noted is not ours
    if run.out_dir is not None:
        check_paths(run.in_path, run.out_dir, options)
    t0 = time.perf_counter()
    steps = steps or STEPS
    # The tokenizer side files: a child process writes them meanwhile (tokenizer_job.py), started first so
    # that its imports overlap the load and the matching, which use one core.
    if run.out_dir is not None and not options.no_tokenizer and step_write in steps:
        run.tokenizer_job = tokenizer_job.start(writer.tokenizer_dir(run),
                                                options.target.chat_template_file, options.trust_remote_code)
    # No cyclic GC while the steps run: they build a graph of ~100k objects that every full collection
    # walked again (0.2 s of a 0.5B rewrite); the cycles they leave go in the first collection after them.
    gc_was = gc.isenabled()
    gc.disable()
    try:
        names = [getattr(s, "__name__", "step").removeprefix("step_") for s in steps]
        with progress.stages(names, "rewrite") as advance:
            for step, name in zip(steps, names):
                log.debug("step %s", name)
                advance(name)
                step(run)
    except RewriteError as exc:
        # A refusal keeps its report (which layer, which check) for --report and the table.
        run.report.error = str(exc)
        run.report.seconds = time.perf_counter() - t0
        exc.run = run
        raise
    finally:
        if gc_was:
            gc.enable()
        if run.tokenizer_job is not None:
            run.tokenizer_job.close()  # a no-op once its files are collected
    run.report.seconds = time.perf_counter() - t0
    return run
