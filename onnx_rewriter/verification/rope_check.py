"""Does every layer of a written folder see the model's own RoPE table, at every position?

Each AttentionPlugin reads `rope_rotary_cos_sin` either from the runtime (which builds the table from
the folder's config.json, see rope.runtime_rope_table) or from a table baked into the graph. Both are
compared with the HF model's table for that layer over positions 0 .. max_position_embeddings-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_rewriter.analysis.rope import first_difference, model_rope_table, runtime_rope_table
from onnx_rewriter.modelio.config_file import read_config

RUNTIME = "runtime (config.json)"


@dataclass
class RopeCheck:
    layers: list[int]
    source: str  # RUNTIME or the baked constant's name
    positions: int
    max_abs: float
    first_bad: int | None  # first position whose row differs beyond tolerance; None: equal everywhere

    @property
    def ok(self) -> bool:
        return self.first_bad is None

    def line(self) -> str:
        span = f"{self.layers[0]}-{self.layers[-1]}" if len(self.layers) > 1 else str(self.layers[0])
        verdict = ("equal" if self.ok else f"DIFFERENT from position {self.first_bad} on"
                   " -- the runtime will NOT reproduce the model's RoPE")
        return (f"rope table: layers {span} read {self.source}; vs the model over positions 0-{self.positions - 1}: "
                f"max abs {self.max_abs:.3e}, {verdict}")


def _rope_sources(model: onnx.ModelProto) -> list[str]:
    """Per plugin, in layer order: RUNTIME or the name of the baked constant its rope input comes from."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consts = {t.name for t in model.graph.initializer}
    out = []
    for node in (n for n in model.graph.node if n.op_type == "AttentionPlugin"):
        source = None
        for name in node.input:
            seen = name
            for _ in range(3):  # 0.11 reads a baked table through Gather(positions) + Squeeze
                if seen == "rope_rotary_cos_sin" or (seen.startswith("rope_rotary_cos_sin_layer") and seen in consts):
                    source = RUNTIME if seen == "rope_rotary_cos_sin" else seen
                    break
                node_in = producer.get(seen)
                if node_in is None or node_in.op_type not in ("Gather", "Squeeze"):
                    break
                seen = node_in.input[0]
            if source:
                break
        out.append(source or "none")
    return out


def _layer_type(hf_config, index: int) -> str | None:
    params = getattr(hf_config, "rope_parameters", None) or {}
    nested = isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values())
    return hf_config.layer_types[index] if nested else None


def check_rope(out_dir, hf_config) -> list[RopeCheck]:
    """One RopeCheck per (table source, model table) group of layers."""
    out_dir = Path(out_dir)
    cfg = read_config(out_dir / "config.json", fix="rewrite the folder again")
    positions = int(cfg["max_position_embeddings"])
    model = onnx.load(str(out_dir / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    groups: dict[tuple, list[int]] = {}
    for i, source in enumerate(_rope_sources(model)):
        groups.setdefault((source, _layer_type(hf_config, i)), []).append(i)
    tables, checks = {}, []
    for (source, layer_type), layers in groups.items():
        if layer_type not in tables:
            tables[layer_type] = model_rope_table(hf_config, positions, layer_type)
        if source == RUNTIME:
            ours = runtime_rope_table(cfg, positions)
        elif source in inits:
            ours = numpy_helper.to_array(inits[source], base_dir=str(out_dir)).reshape(-1, tables[layer_type].shape[-1])
        else:
            ours = np.zeros((0, tables[layer_type].shape[-1]), np.float32)
        max_abs, first_bad = first_difference(ours, tables[layer_type])
        if ours.shape[0] < positions:  # a table shorter than the range is wrong past its end
            first_bad = ours.shape[0] if first_bad is None else first_bad
        checks.append(RopeCheck(layers, source, positions, max_abs, first_bad))
    return checks
