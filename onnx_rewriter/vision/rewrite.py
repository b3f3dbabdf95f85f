"""Rewrite a plain vision-tower export: every attention block becomes one ViTAttentionPlugin.

The vision pattern library (patterns/ `VISION_STAGES`) finds each block's attention and its 2-D RoPE;
each block's mask is then probed with onnxruntime on sample inputs and must be exactly the segment mask
of `cu_seqlens` (full blocks) or `cu_window_seqlens` (window blocks) before anything is fused. RoPE
stays in the graph, before the plugin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import engine
from ..errors import PatternMismatch, UnsupportedModel
from ..patterns import VISION_STAGES, load_patterns
from . import plugin

SEGMENT_INPUTS = ("cu_seqlens", "cu_window_seqlens")  # full blocks, window blocks
NEGATIVE = -1e4  # a masked-out score: the fp16 minimum (-65504) or lower


def segment_mask_ok(mask: np.ndarray, cu: np.ndarray) -> bool:
    """True when `mask` is 0 inside every segment of `cu` and strongly negative across segments."""
    tokens = int(np.asarray(cu)[-1])
    seg = np.searchsorted(np.asarray(cu)[1:], np.arange(tokens), side="right")
    same = seg[:, None] == seg[None, :]
    mask = np.asarray(mask, dtype=np.float32)
    if mask.ndim > 2 and all(d == 1 for d in mask.shape[:-2]):
        mask = mask.reshape(mask.shape[-2:])
    try:
        mask = np.broadcast_to(mask, same.shape)  # a broadcast mask (one value for all) is checked as such
    except ValueError:
        return False
    return bool(np.all(mask[same] == 0) and np.all(mask[~same] <= NEGATIVE))


def _probe_masks(model: onnx.ModelProto, names: list[str], feeds: dict) -> dict:
    """The value of each mask tensor on `feeds` (the plain model run in onnxruntime)."""
    import onnxruntime as ort

    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    fallback = next(i.type.tensor_type.elem_type for i in model.graph.input if i.name == "input")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, types.get(n, fallback), None) for n in names)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    values = sess.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, values))


def _segments(attns, model, feeds) -> dict:
    """mask tensor name -> the segment input it is the mask of; refuses a block whose mask is neither."""
    names = sorted({a.mask.name for _, a in attns})
    values = _probe_masks(model, names, feeds)
    found = {}
    for block, attn in attns:
        hits = [s for s in SEGMENT_INPUTS if s in feeds and segment_mask_ok(values[attn.mask.name], feeds[s])]
        if len(hits) != 1:
            raise PatternMismatch(f"vision block {block}: the attention mask '{attn.mask.name}' is not the segment "
                                  f"mask of exactly one of {', '.join(SEGMENT_INPUTS)} (probed on sample inputs); "
                                  "the ViTAttentionPlugin attends within cu_seqlens segments only")
        found[attn.mask.name] = hits[0]
    return found


def _attentions(graph: gs.Graph, depth: int) -> list:
    ctx = engine.run(graph, list(VISION_STAGES), load_patterns(VISION_STAGES))
    softmaxes = [n for n in graph.nodes if n.op == "Softmax"]
    attns = []
    for block, node in enumerate(softmaxes):
        m = ctx.anchor_match("vit_attention", node)
        if m is None:
            why = "; ".join(miss.describe() for miss in ctx.anchor_misses("vit_attention", node))
            raise PatternMismatch(f"vision block {block}: attention not recognized ({why})")
        attns.append((block, m.result))
    if len(attns) != depth:
        raise PatternMismatch(f"found {len(attns)} attention blocks in the vision export, vision_config.depth is "
                              f"{depth}")
    return attns


def _scale(attn, block: int, target) -> float:
    """The plugin's attention_scale: exactly 1/sqrt(D) when the graph's constant is that value rounded to
    its float type (an fp16 export stores 0.17676 for 1/sqrt(32)); runtimes before 0.9.1 ignore the
    attribute, so `edgellm-0.9` refuses any other scale."""
    default = attn.head_size ** -0.5
    if any(np.dtype(t).type(attn.scale) == np.dtype(t).type(default) for t in (np.float16, np.float32)):
        return default
    if target.name in plugin.DEFAULT_SCALE_ONLY:
        raise UnsupportedModel(f"vision block {block}: attention scale {attn.scale:g} is not 1/sqrt(head_size); "
                               "ViTAttentionPlugin before runtime 0.9.1 ignores attention_scale")
    return float(attn.scale)


def rewrite(plain: Path, out: Path, vision_config, target, feeds: dict) -> dict:
    """Rewrite the plain export `plain` into `out` (model.onnx + model.onnx.data) for `target`.

    `feeds`: sample encoder inputs (host.encoder_inputs) for the mask probe. Returns the report."""
    attrs_for = plugin.ATTRIBUTES[target.name]
    model = onnx.load(str(plain))
    graph = gs.import_onnx(model)
    attns = _attentions(graph, int(vision_config.depth))
    segments = _segments(attns, model, feeds)
    carrier = gs.Variable("max_seqlen_carrier", dtype=np.int32, shape=["max_seqlen"])
    window_carrier = None
    if "cu_window_seqlens" in segments.values():  # the longest window: (window_size / patch_size)² patches
        window_len = (vision_config.window_size // vision_config.patch_size) ** 2
        window_carrier = gs.Constant("window_seqlen_carrier", np.zeros(window_len, dtype=np.int32))
    inputs = {t.name: t for t in graph.inputs}
    blocks = []
    for block, attn in attns:
        heads = int(vision_config.num_heads)
        if attn.num_heads not in (None, heads) or attn.head_size * heads != int(vision_config.hidden_size):
            raise PatternMismatch(f"vision block {block}: {attn.num_heads} heads of {attn.head_size} do not match "
                                  f"vision_config ({heads} heads, hidden {vision_config.hidden_size})")
        scale = _scale(attn, block, target)
        segment = segments[attn.mask.name]
        attn.out.inputs.clear()  # the Transpose back to [T, H, D] is replaced by the plugin's output
        graph.nodes.append(gs.Node(
            plugin.OP, name=f"/visual/blocks.{block}/attn/{plugin.OP}", domain=plugin.DOMAIN,
            inputs=[attn.q, attn.k, attn.v, inputs[segment], carrier if segment == "cu_seqlens" else window_carrier],
            outputs=[attn.out], attrs=attrs_for(heads, attn.head_size, scale)))
        blocks.append({"block": block, "attention": "full" if segment == "cu_seqlens" else "window",
                       "segments": segment, "num_heads": heads, "head_size": attn.head_size,
                       "attention_scale": scale})
    graph.inputs.append(carrier)
    graph.cleanup().toposort()
    result = gs.export_onnx(graph)
    result.opset_import.append(onnx.helper.make_opsetid(plugin.DOMAIN, 1))
    plugin.register_schema()
    onnx.checker.check_model(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(result, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
              location=out.name + ".data", size_threshold=0)
    return {"target": target.name, "blocks": blocks, "inputs": [t.name for t in graph.inputs],
            "outputs": [t.name for t in graph.outputs]}
