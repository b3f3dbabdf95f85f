"""INT4 experts from an AutoAWQ / GPTQ checkpoint, written into Int4MoePlugin as their own codes (contract part 3
§15.4 step 4; docs/contract.md, "Mixture-of-Experts decoders").

`export` traces such a checkpoint with its dequantized weights (hf/export.py stacks the per-expert linears into
transformers' [E, 2I, H] / [E, H, I]); here each routed block's experts are found by name in the checkpoint
(`...layers.{L}.mlp.experts.{e}.gate_proj / up_proj / down_proj`, Mixtral's w1 / w3 / w2) and turned into the
plugin's U and scales by `layout.expert_codes`: exact or refused (act-order g_idx, a zero point that does not fit a
nibble, a group size the plugin cannot take). At write time the codes are checked against the traced weights
(the plugin's (U - 8) * s must be the fp16 weight the export traced, bit for bit), so a checkpoint whose experts
are not what the graph computes is refused instead of written.
"""

from __future__ import annotations

import re

import numpy as np

from onnx_rewriter.errors import UnsupportedModel
from onnx_rewriter.features.int4 import layout as int4_layout
from onnx_rewriter.features.int4.checkpoint import Checkpoint
from onnx_rewriter.features.moe import layout

PARTS = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}
GROUPS = (32, 64, 128)  # Int4MoePlugin's group sizes (or one group over K)


class CheckpointExperts:
    """The expert linears of an AWQ / GPTQ checkpoint folder, per decoder layer."""

    def __init__(self, folder):
        self.ck = Checkpoint(folder)
        self.method = str(self.ck.qc.get("quant_method", "")).lower()
        self.by_layer: dict = {}
        pat = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)$")
        names = {n: part for part, ns in PARTS.items() for n in ns}
        for p in self.ck.prefixes:
            m = pat.search(p)
            if m and m.group(3) in names:
                self.by_layer.setdefault(int(m.group(1)), {})[(int(m.group(2)), names[m.group(3)])] = p

    def group(self, layer: int, b) -> int:
        """The block's one group size (checked: every expert complete, G fits H and I), refusing otherwise."""
        found = self.by_layer.get(layer, {})
        want = {(e, p) for e in range(b.experts) for p in PARTS}
        if set(found) != want:
            raise UnsupportedModel(f"layer {layer}: the checkpoint's INT4 experts are not {b.experts} complete "
                                   f"gate/up/down linears ({len(found)} of {len(want)} found); Int4MoePlugin takes "
                                   f"every expert of a block from the checkpoint or none")
        g = int(self.ck.linear(found[(0, "gate")]).group)
        bad = [k for k in (b.hidden, b.inter) if not (g in GROUPS and k % g == 0) and g != k]
        if bad:
            raise UnsupportedModel(f"layer {layer}: the checkpoint's group size {g} does not fit K = {bad[0]} "
                                   f"(Int4MoePlugin: one group size of 32, 64 or 128 dividing H = {b.hidden} and "
                                   f"I = {b.inter}); its experts cannot be written exactly")
        return g

    def codes(self, layer: int, e: int, part: str) -> tuple[np.ndarray, np.ndarray]:
        """(U [N, K], fp16 scales [K/G, N]) of one expert linear, exactly, or a one-line refusal."""
        prefix = self.by_layer[layer][(e, part)]
        try:
            return layout.expert_codes(self.ck.linear(prefix), prefix)
        except ValueError as exc:
            raise UnsupportedModel(f"layer {layer}: {self.method} expert {exc}") from None

    def check(self, layer: int, b) -> int:
        """Every expert of the block expressible exactly (read once, nothing kept); returns the group size."""
        g = self.group(layer, b)
        for e in range(b.experts):
            for part in PARTS:
                self.codes(layer, e, part)
        return g

    def packed(self, layer: int, b, group: int, traced_gate_up, traced_down) -> tuple:
        """(fc_gate_up_qweights, fc_gate_up_scales, fc_down_qweights, fc_down_scales) from the checkpoint's codes,
        each expert's dequantized value compared with the traced weights ([E, 2I, H], [E, H, I]) first."""
        fc1_u, fc1_s, fc2_u, fc2_s = [], [], [], []
        for e in range(b.experts):
            (gu, gs), (uu, us), (du, ds) = (self.codes(layer, e, p) for p in PARTS)
            u1, s1 = layout.int4_fc1(gu, uu), np.concatenate([gs, us], axis=1)  # [gate; up] rows, their scales
            for what, u, s, traced in (("gate/up", u1, s1, traced_gate_up[e]), ("down", du, ds, traced_down[e])):
                if not np.array_equal(int4_layout.dequantize(u, s, group), np.asarray(traced, np.float16)):
                    raise UnsupportedModel(f"layer {layer}: expert {e}'s {what} codes in the checkpoint are not the "
                                           f"weights the export traced; was the graph made from this checkpoint?")
            fc1_u.append(u1)
            fc1_s.append(s1)
            fc2_u.append(du)
            fc2_s.append(ds)
        return (*layout.pack_int4_experts(fc1_u, fc1_s), *layout.pack_int4_experts(fc2_u, fc2_s))
