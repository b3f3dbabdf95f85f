"""Mixture-of-Experts routers in a graph: a Softmax whose output a TopK reads (contract part 3 §15.2).

Attention's Softmax never feeds a TopK; an MoE router does (transformers' Qwen3-MoE / Qwen2-MoE exports:
`Gemm(x, mlp.gate.weight) -> Softmax [-> Cast] -> TopK(k)`, docs/contract.md, "Mixture-of-Experts"). `routers` lists
them with the decoder layer they sit in (counted by the attention Softmaxes before them): the rewrite takes
their Softmaxes out of the attention anchors, implies the moe feature, and names the layer of a block the
moe_block pattern did not read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs


@dataclass
class Router:
    layer: int  # decoder layer (0-based), counted by the attention Softmaxes before it
    softmax: str
    topk: str
    experts: int | None  # the Softmax's last dim, when known
    top_k: int | None  # the TopK's constant k, when known


def _k(node: gs.Node) -> int | None:
    if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        v = np.asarray(node.inputs[1].values).reshape(-1)
        return int(v[0]) if v.size == 1 else None
    return None


def routers(graph: gs.Graph) -> list[Router]:
    found, attention = [], 0
    for node in graph.nodes:  # topological order
        if node.op != "Softmax":
            continue
        # bf16 / fp16 exports cast the probabilities to fp32 first (Softmax -> Cast -> TopK): looked through, or
        # such a model's MoE blocks were left as exported, unrewritten and unreported
        readers = [c for c in node.outputs[0].outputs]
        readers += [r for c in readers if c.op == "Cast" for r in c.outputs[0].outputs]
        topks = [c for c in readers if c.op == "TopK"]
        if not topks:
            attention += 1
            continue
        shape = node.outputs[0].shape
        e = shape[-1] if shape and isinstance(shape[-1], int) else None
        found.append(Router(max(attention - 1, 0), node.name, topks[0].name, e, _k(topks[0])))
    return found
