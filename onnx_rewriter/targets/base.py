"""What every target shares, and the pieces the batch-major dense targets (0.5, 0.9) have in common.

A target receives the matched layers (target-agnostic) and owns everything the runtime contract
decides: the plugin node, graph inputs and outputs, dtype boundaries, side files, version strings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_rewriter.analysis.rope import first_difference, runtime_rope_table, table_tolerance
from onnx_rewriter.matching.results import AttentionLayer
from onnx_rewriter.modelio.normalize import replace_uses

from ..errors import RewriteError, UnsupportedModel
from ..projections import packed

B, S, CAP, P, KV_START = "batch_size", "seq_len", "kv_cache_capacity", "rope_max_positions", "kv_start_batch"


@dataclass
class Build:
    """What the pipeline hands a target: the graph, matched layers and graph-level facts."""

    graph: gs.Graph
    layers: list[AttentionLayer]
    inputs_embeds: gs.Variable  # [B, S, H], already a graph input
    logits: gs.Tensor  # the original logits output
    float_type: int  # onnx.TensorProto.FLOAT16 or FLOAT
    opset: int
    rope_positions: int = 4096  # rows of a baked RoPE table: config.json's max_position_embeddings
    runtime_config: dict | None = None  # the written config.json, from which the runtime builds its RoPE table
    kept_inputs: tuple = ()  # the export's inputs a feature keeps (VLM deepstack), after the target's own


@dataclass
class PluginWiring:
    """How a target wires one AttentionPlugin per layer (Target.plugin_layers)."""

    cache_shape: list  # the KV cache: graph input `past_key_values_i`, output `present_key_values_i`
    out_shape: Callable  # out_shape(layer): the plugin output's shape
    layer_inputs: Callable  # layer_inputs(em, layer, past) -> (inputs, attrs): what feeds the plugin
    layer_output: Callable  # layer_output(em, attn): the plugin's output back to the core's [B, Hq, S, D]
    flat_shape: Callable  # flat_shape(layer): the Reshape of the output replacing a head-merging view


class Target:
    name: str
    edgellm_version: str
    releases: str = ""  # the runtime releases the target serves (--help, inspect, README)
    domain: str = "trt"
    opset: int | None = None  # None: keep the input's
    chat_template_file = "processed_chat_template.json"
    prefill_head_sizes = (64, 72, 80, 128, 256)
    max_group = 8
    supports_sliding_window = True
    vlm_text = True  # can run a VLM text decoder (an M-RoPE table from config.json, deepstack inputs)
    token_major = False  # graph inputs [T, H] (all sequences' tokens in one row), not batch-major [B, S, H]

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<Target {self.name}>"

    # -- capability checks: before anything is written
    def check(self, layers: list[AttentionLayer], warn) -> None:
        first = layers[0]
        for l in layers[1:]:
            if (l.num_q_heads, l.num_kv_heads, l.head_size, l.rotary_dim) != (
                first.num_q_heads, first.num_kv_heads, first.head_size, first.rotary_dim):
                raise UnsupportedModel(
                    f"layer {l.index} has (q heads, kv heads, head size, rotary dims) = "
                    f"{(l.num_q_heads, l.num_kv_heads, l.head_size, l.rotary_dim)} but layer 0 has "
                    f"{(first.num_q_heads, first.num_kv_heads, first.head_size, first.rotary_dim)}; "
                    f"the runtime needs uniform heads")
        if first.head_size not in self.prefill_head_sizes:
            warn(f"head size {first.head_size} has no {self.name} prefill kernel in the runtime "
                 f"(built-in: {', '.join(map(str, self.prefill_head_sizes))}); the engine may not build")
        if first.num_q_heads // first.num_kv_heads > self.max_group:
            warn(f"{first.num_q_heads // first.num_kv_heads} q heads per kv head exceeds the runtime's "
                 f"usual limit of {self.max_group}")
        if first.head_size % 2 or first.rotary_dim % 2 or not 0 < first.rotary_dim <= first.head_size:
            raise UnsupportedModel(f"head size {first.head_size} with {first.rotary_dim} rotary dims: the plugin's "
                                   f"rotate_half RoPE needs an even rotary width within the head")
        for l in layers:
            # A non-default scale is fine (pre-applied to q, or the attention_scale attribute); a
            # non-positive or non-finite one is a mismatch, not a model.
            if not (np.isfinite(l.scale) and l.scale > 0):
                raise UnsupportedModel(f"layer {l.index}: attention scale {l.scale} cannot be expressed by the plugin")
            if l.sliding_window and not self.supports_sliding_window:
                raise UnsupportedModel(f"layer {l.index} uses a sliding window of {l.sliding_window} tokens, which "
                                       f"{self.name} cannot run")

    def build(self, b: Build) -> None:
        raise NotImplementedError

    def plugin_layers(self, b: Build, np_float, wiring: PluginWiring):
        """One AttentionPlugin per layer, its KV cache as graph input `past_key_values_i` and output
        `present_key_values_i` of `wiring.cache_shape`. `wiring.layer_inputs` adds what feeds the plugin;
        `wiring.layer_output` turns the plugin's output (`wiring.out_shape(layer)`) back into the core's
        [B, Hq, S, D], which replaces the layer's attention. Where o_proj reads a checked head-merging view
        of it (`layer.views`), one Reshape of the plugin's output to `wiring.flat_shape(layer)` replaces
        that view instead. Returns (pasts, presents)."""
        cache_shape, out_shape, layer_inputs, layer_output, flat_shape = (
            wiring.cache_shape, wiring.out_shape, wiring.layer_inputs, wiring.layer_output, wiring.flat_shape)
        g = b.graph
        pasts, presents = [], []
        for layer in b.layers:
            i = layer.index
            em = Emitter(g, f"layers.{i}/attn")
            past = gs.Variable(f"past_key_values_{i}", np_float, list(cache_shape))
            present = gs.Variable(f"present_key_values_{i}", np_float, list(cache_shape))
            inputs, attrs = layer_inputs(em, layer, past)
            attn = gs.Variable(f"layers.{i}/attn/AttentionPlugin_out", np_float, out_shape(layer))
            g.nodes.append(gs.Node("AttentionPlugin", name=f"layers.{i}/attn/AttentionPlugin", domain=self.domain,
                                   inputs=inputs, outputs=[attn, present], attrs=attrs))
            flat = layer.views.get(layer.out.name)
            if flat is not None:
                shape = em.const("shape", np.array(flat_shape(layer), dtype=np.int64))
                replace_uses(g, flat, em.node("Reshape", [attn, shape]))
            else:
                replace_uses(g, layer.out, layer_output(em, attn))
            pasts.append(past)
            presents.append(present)
        return pasts, presents

    def plugin_attrs(self, layer: AttentionLayer) -> dict:
        return {
            "num_q_heads": layer.num_q_heads, "num_kv_heads": layer.num_kv_heads, "head_size": layer.head_size,
            "enable_tree_attention": 0, "enable_fp8_kv_cache": 0,
            "sliding_window_size": layer.sliding_window if layer.sliding_window else -1,
            "qkv_scales": [1.0, 1.0, 1.0],
        }


# ------------------------------------------------------------------ helpers for graph surgery


class Emitter:
    """Adds nodes with unique, readable names."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix, self.n = graph, prefix, 0

    def node(self, op: str, inputs, attrs=None, dtype=None, shape=None, n_out=1, domain=None, name=None):
        self.n += 1
        base = name or f"{self.prefix}/{op}_{self.n}"
        outs = [gs.Variable(f"{base}_out{k}" if n_out > 1 else f"{base}_out", dtype=dtype, shape=shape)
                for k in range(n_out)]
        node = gs.Node(op, name=base, inputs=list(inputs), outputs=outs, attrs=attrs or {}, domain=domain)
        self.graph.nodes.append(node)
        return outs if n_out > 1 else outs[0]

    def const(self, name: str, values) -> gs.Constant:
        self.n += 1
        return gs.Constant(f"{self.prefix}/{name}_{self.n}", np.asarray(values))


def to_bshd_flat(em: Emitter, x: gs.Tensor, heads: int, head_size: int) -> gs.Tensor:
    """[B, H, S, D] -> [B, S, H*D] (normalize's Transpose/Reshape folding removes what cancels)."""
    t = em.node("Transpose", [x], {"perm": [0, 2, 1, 3]})
    return em.node("Reshape", [t, em.const("shape", np.array([0, 0, heads * head_size], dtype=np.int64))])


def flat_input(em: Emitter, layer: AttentionLayer, x: gs.Tensor, heads: int, head_size: int,
               layout: str = "bhsd") -> gs.Tensor:
    """`x` ([B, H, S, D], or [B, S, H, D] for "bshd") as [B, S, H·D]: the projection output it is a view of
    (projections.find_views, no node), else a Transpose / Reshape."""
    src = layer.views.get(x.name)
    if src is not None:
        return src
    if layout == "bshd":
        return em.node("Reshape", [x, em.const("shape", np.array([0, 0, heads * head_size], dtype=np.int64))])
    return to_bshd_flat(em, x, heads, head_size)


def pack_qkv(em: Emitter, q: gs.Tensor, k: gs.Tensor, v: gs.Tensor) -> gs.Tensor:
    """q, k, v concatenated on the last axis: the fused projection itself where they are its Split's parts."""
    return packed([q, k, v]) or em.node("Concat", [q, k, v], {"axis": -1})


def prescale_q(em: Emitter, q: gs.Tensor, layer: AttentionLayer, np_float) -> gs.Tensor:
    """Non-default softmax scale folded into q (RoPE is linear, so scaling q first is exact)."""
    factor = layer.scale / layer.default_scale
    if abs(factor - 1.0) < 1e-6:
        return q
    return em.node("Mul", [q, em.const("q_prescale", np.array(factor, dtype=np_float))])


def same_rope(a: AttentionLayer, b: AttentionLayer) -> bool:
    ta, tb = a.rope, b.rope
    return ta is tb or (a.rotary_dim == b.rotary_dim and ta.inv_freq.shape == tb.inv_freq.shape
                        and np.allclose(ta.inv_freq, tb.inv_freq, rtol=1e-6, atol=0)
                        and abs(ta.attention_scaling - tb.attention_scaling) <= 1e-6)


def layer_rope_table(layer: AttentionLayer, positions: int, start: int = 0) -> np.ndarray:
    """The layer's own `[positions, R]` fp32 cos|sin table (rows `start` on), computed as the model computes it
    (fp32 angles p·inv_freq, times attention_scaling)."""
    inv = np.asarray(layer.rope.inv_freq, dtype=np.float32).reshape(-1)
    f = np.arange(start, positions, dtype=np.float32)[:, None] * inv[None, :]
    table = np.concatenate([np.cos(f), np.sin(f)], axis=-1) * np.float32(layer.rope.attention_scaling)
    return np.ascontiguousarray(table.astype(np.float32))


# Positions per block when a table is compared or built: 131072 x 128 positions made ~250 MB of temporaries
# at once (the peak of a whole 1.5B rewrite); a block's are ~10 MB, and every value is the same.
ROPE_BLOCK = 8192


def runtime_builds_it(layer: AttentionLayer, b: Build) -> bool:
    """Whether the table the runtime builds from config.json equals the layer's own at every position."""
    if b.runtime_config is None:
        return False
    fp16 = b.float_type == onnx.TensorProto.FLOAT16
    for start in range(0, b.rope_positions, ROPE_BLOCK):
        stop = min(b.rope_positions, start + ROPE_BLOCK)
        runtime = runtime_rope_table(b.runtime_config, stop, start)
        if first_difference(runtime, layer_rope_table(layer, stop, start), table_tolerance(stop, fp16, start))[1] \
                is not None:
            return False
    return True


def baked_rope_table(layer: AttentionLayer, positions: int) -> np.ndarray:
    """`[1, P, R]`: the layer's table, filled block by block (no whole-table temporaries)."""
    first = layer_rope_table(layer, min(positions, ROPE_BLOCK))
    table = np.empty((1, positions, first.shape[-1]), np.float32)
    table[0, :len(first)] = first
    for start in range(len(first), positions, ROPE_BLOCK):
        stop = min(positions, start + ROPE_BLOCK)
        table[0, start:stop] = layer_rope_table(layer, stop, start)
    return table


def rope_input(layer: AttentionLayer, b: Build, shared: gs.Tensor, baked: dict) -> gs.Tensor:
    """What the layer's plugin reads as `rope_rotary_cos_sin`: the runtime's input (`shared`) where the
    table the runtime builds from config.json equals the layer's own at every position up to
    max_position_embeddings; otherwise the layer's table baked into the graph as a `[1, P, R]` constant.

    Decided by comparing the numbers, not by rope type, and alike on every target: no runtime release
    these targets name builds llama3 / linear / yarn tables (they become plain default RoPE there;
    rotaryScale-style "proportional" RoPE, which could express linear, is newer than 0.11.0), and
    Gemma3's local layers use another theta than config.json. dynamic (below its trigger length) and
    longrope are built by the runtime itself. Cost: P·R·4 bytes per distinct table, shared by the layers
    using it (Llama-3.2-1B: 131072·64·4 = 32 MiB; Gemma3-1B's local layers: 32768·256·4 = 32 MiB). The
    runtime still binds its `rope_rotary_cos_sin` input even when no layer reads it: it stays a graph input.
    `baked` caches one decision per distinct table."""
    for other, tensor in baked.values():
        if same_rope(layer, other):
            return tensor
    if runtime_builds_it(layer, b):
        tensor = shared
    else:
        tensor = gs.Constant(f"rope_rotary_cos_sin_layer{layer.index}", baked_rope_table(layer, b.rope_positions))
    baked[layer.index] = (layer, tensor)
    return tensor


def lm_head_input(logits: gs.Tensor) -> tuple[gs.Node, int]:
    """The MatMul that computes logits from the final hidden state: (node, index of the hidden input)."""
    t = logits
    for _ in range(8):
        node = t.inputs[0] if t.inputs else None
        if node is None:
            break
        if node.op in ("MatMul", "Gemm"):
            return node, 0
        # soft-capping, Casts, Identity between lm_head and the output are kept as they are
        nxt = [i for i in node.inputs if not isinstance(i, gs.Constant)]
        if len(nxt) != 1:
            gemm = next((i.inputs[0] for i in nxt if i.inputs and i.inputs[0].op == "Gemm"), None)
            if gemm is not None:  # Gemm takes 2-D only: flattened and reshaped back around it
                raise UnsupportedModel(f"lm_head is a Gemm ('{gemm.name}') between Reshapes; only a MatMul lm_head on "
                                       f"[B, S, H] is supported: export with torch.onnx.export(dynamo=True)")
            break
        t = nxt[0]
    raise RewriteError(f"cannot find the lm_head MatMul that produces '{logits.name}'; is this a causal LM export?")


def gather_last_tokens(em: Emitter, logits: gs.Tensor, index_input: gs.Variable, batch_dims: int) -> None:
    """Insert GatherND(hidden, Unsqueeze(index, -1)) before lm_head, so only needed rows are projected."""
    mm, i = lm_head_input(logits)
    hidden = mm.inputs[i]
    idx = em.node("Unsqueeze", [index_input, em.const("axes", np.array([-1], dtype=np.int64))])
    gathered = em.node("GatherND", [hidden, idx], {"batch_dims": batch_dims})
    mm.inputs[i] = gathered


def set_logits_output(graph: gs.Graph, logits: gs.Tensor, shape) -> gs.Variable:
    """The graph output `logits`, fp32, with the contract's shape."""
    out = gs.Variable("logits", dtype=np.float32, shape=shape)
    logits.name = "logits_pre_cast"
    cast = gs.Node("Cast", name="logits/Cast", inputs=[logits], outputs=[out], attrs={"to": onnx.TensorProto.FLOAT})
    graph.nodes.append(cast)
    graph.outputs = [out if t is logits else t for t in graph.outputs]
    return out


def remove_inputs(graph: gs.Graph, names) -> None:
    graph.cleanup()
    for t in [t for t in graph.inputs if t.name in names]:
        if t.outputs:
            users = ", ".join(f"{n.op} '{n.name}'" for n in t.outputs[:3])
            raise RewriteError(f"the rewritten graph still reads '{t.name}' (from {users}); "
                               f"this export has a path the rewriter does not understand")
        graph.inputs.remove(t)


def set_io(b: Build, entry: gs.Variable, pasts, extra_inputs, logits: gs.Variable, presents) -> None:
    """The contract's I/O order: `entry` (the embeddings input), the caches, the target's other inputs,
    then what the body still reads; outputs logits and the caches. The export's own inputs (ids, mask,
    positions) must be unread by now (remove_inputs says where they are not)."""
    graph = b.graph
    kept = [t for t in graph.inputs if any(t is k for k in b.kept_inputs)]
    rest = [t for t in graph.inputs if t is not b.inputs_embeds and not any(t is k for k in kept)]
    old = [t.name for t in rest]
    graph.inputs = [entry] + pasts + extra_inputs + kept + rest
    graph.outputs = [logits] + presents
    remove_inputs(graph, old)
