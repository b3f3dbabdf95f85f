"""VLM text decoders (Qwen2.5-VL, Qwen3-VL): M-RoPE as the runtime's table input, deepstack inputs, config keys.

Implied by the input: a `position_ids` graph input of shape [3, B, S] (hf/vlm.py exports the decoder so).
The graph changes only at the RoPE input's meaning and, for Qwen3-VL, the deepstack inputs:

- `edgellm-0.9`: `rope_rotary_cos_sin` fp32 `[B, P, R]`, one table per batch row (dim 0 dynamic) that the
  runtime builds from `mrope_section`; `deepstack_embeds_{i}` fp16 `[B, S, H]`, added after layer i.
- `edgellm-0.10`: as 0.9 (batch-major; contract 3 §17.5).
- `edgellm-0.11`: fp32 `[T, R]`, one resolved row per token; `deepstack_embeds_{i}` fp16 `[T, H]`, after
  `logits_indices`.
- `edgellm-0.5`: refused (runtimes 0.4/0.5 hard-code the sections for R = 128, no ViT plugin).
"""

from __future__ import annotations

import re

import numpy as np
import onnx_graphsurgeon as gs

from onnx_rewriter.features.base import Feature

from ..errors import RewriteError, UnsupportedModel
from ..targets.base import B, S

ROTARY_DIMS = (64, 128)  # the only widths the runtime's M-RoPE table kernel takes
DEEPSTACK = re.compile(r"deepstack_embeds_(\d+)$")


def check_target(target) -> None:
    """Refuse a Target without a VLM route (Target.vlm_text), naming those that have one."""
    if not target.vlm_text:
        from ..targets import TARGETS

        raise UnsupportedModel(
            f"VLM text decoders cannot be written for {target.name}: runtimes 0.4/0.5 hard-code the M-RoPE "
            f"sections ([16,24,24] / [24,20,20] for rotary dim 128) and have no ViTAttentionPlugin; "
            f"use {' or '.join(t.name for t in TARGETS.values() if t.vlm_text)}")


def is_mrope_graph(graph: gs.Graph) -> bool:
    return any(t.name == "position_ids" and t.shape is not None and len(t.shape) == 3 and t.shape[0] == 3
               for t in graph.inputs)


def deepstack_inputs(graph: gs.Graph) -> list[gs.Variable]:
    found = sorted((int(m.group(1)), t) for t in graph.inputs if (m := DEEPSTACK.match(t.name)))
    if [i for i, _ in found] != list(range(len(found))):
        raise RewriteError(f"deepstack inputs {[t.name for _, t in found]} are not numbered 0..{len(found) - 1}")
    return [t for _, t in found]


class Vlm(Feature):
    name = "vlm"

    def check(self, run, target) -> None:
        check_target(target)
        tables = {id(l.rope): l.rope for l in run.layers}.values()
        plain = [l.index for l in run.layers if not l.rope.mrope_section]
        if plain:
            raise UnsupportedModel(f"layer {plain[0]}: its RoPE does not read the [3, B, S] position_ids (no M-RoPE "
                                   f"table matched); the runtime applies one M-RoPE table to every layer")
        kinds = {(tuple(t.mrope_section), t.mrope_interleaved) for t in tables}
        if len(kinds) != 1:
            raise UnsupportedModel(f"layers use different M-RoPE sections {sorted(kinds)}; config.json holds one")
        (sections, interleaved), = kinds
        r = run.layers[0].rotary_dim
        if r not in ROTARY_DIMS:
            raise UnsupportedModel(f"layer 0: rotary dim {r}; the runtime builds M-RoPE tables only for "
                                   f"{' or '.join(map(str, ROTARY_DIMS))}")
        if not interleaved and any(s % 8 for s in sections):
            raise UnsupportedModel(f"M-RoPE sections {list(sections)}: the runtime needs each non-interleaved "
                                   f"section divisible by 8")
        nd = len(deepstack_inputs(run.source.graph))
        if nd > len(run.layers):
            raise UnsupportedModel(f"{nd} deepstack inputs for {len(run.layers)} layers")
        run.report.features[self.name] = {"mrope_section": list(sections), "mrope_interleaved": interleaved,
                                          "num_deepstack_features": nd}

    def kept_inputs(self, run) -> list:
        return deepstack_inputs(run.source.graph)

    def apply(self, run, build) -> None:
        g = build.graph
        names = {t.name for t in g.inputs}
        plugins = [n for n in g.nodes if n.op == "AttentionPlugin"]
        # An M-RoPE table cannot be baked (it depends on each image's grid): every layer reads the input.
        baked = [n.name for n in plugins if "rope_rotary_cos_sin" not in {i.name for i in n.inputs}]
        if baked or "rope_rotary_cos_sin" not in names:
            raise UnsupportedModel(f"{baked[0] if baked else 'the graph'}: the model's RoPE table differs from the "
                                   f"one the runtime builds from config.json; an M-RoPE table cannot be baked")
        for t in deepstack_inputs(g):  # the entry's dims: what the builder's inputs_embeds profile covers
            t.shape = [B, S, t.shape[-1]]
        if run.options.target.token_major:
            for t in deepstack_inputs(g):  # token-major: [T, H] in, the body's [1, T, H] by Unsqueeze
                hidden = t.shape[-1]
                flat = gs.Variable(t.name, t.dtype, ["num_tokens", hidden])
                t.name, t.shape = f"{t.name}_batch_major", [1, "num_tokens", hidden]
                axes = gs.Constant(f"{flat.name}/axes", np.array([0], dtype=np.int64))
                g.nodes.append(gs.Node("Unsqueeze", name=f"{flat.name}/Unsqueeze", inputs=[flat, axes], outputs=[t]))
                g.inputs[g.inputs.index(t)] = flat

    def config(self, run, cfg: dict) -> None:
        """§10.3: M-RoPE in rope_scaling, deepstack count, vision_config and the image token ids."""
        hf = run.hf_config or {}
        text = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else hf
        info = run.report.features.get(self.name) or {}
        scaling = {k: v for k, v in (text.get("rope_parameters") or text.get("rope_scaling") or {}).items()
                   if k not in ("rope_theta", "type", "rope_type")}
        scaling.update(type="default", rope_type="default", mrope_section=info.get("mrope_section"))
        if info.get("mrope_interleaved"):
            scaling["mrope_interleaved"] = True
        cfg["rope_scaling"] = scaling
        cfg["num_deepstack_features"] = info.get("num_deepstack_features", 0)
        if isinstance(hf.get("vision_config"), dict):
            cfg["vision_config"] = hf["vision_config"]
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if hf.get(key) is not None:
                cfg[key] = hf[key]
        if text.get("model_type"):
            cfg["model"] = text["model_type"]
