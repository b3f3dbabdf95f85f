"""Path-style names for the linears: `/model/layers.{i}/self_attn/q_proj/MatMul`, `/lm_head/MatMul`.

NVIDIA's `tensorrt-edgellm-insert-lora` derives each LoRA binding name from the GEMM's node name (stem rule
below), and adapters bind by exact name, so a linear must be named after its HF module
(`model.layers.0.self_attn.q_proj`). Exports lose that name in different places; it is recovered from:

1. the node's `pkg.torch.onnx.name_scopes` metadata (torch.onnx dynamo), read at load time
   (`modelio.graph.module_paths`) because onnx-graphsurgeon drops node metadata; the scopes above the
   `*ForCausalLM` module (our export's wrapper) are cut off;
2. a node name that already is path-style (TorchScript and Optimum exports);
3. the weight initializer's name `<path>.weight` (exports that keep the weight untransposed).

A linear none of them names keeps its export name (the report counts it).
"""

from __future__ import annotations

import re

import onnx_graphsurgeon as gs

_PATH_NODE = re.compile(r"^/(?:[^/]+/)+(?:MatMul|Gemm)(?:_\d+)?$")


def node_name(path: str, op: str = "MatMul") -> str:
    """`model.layers.0.self_attn.q_proj` -> `/model/layers.0/self_attn/q_proj/MatMul` (TorchScript's style:
    an index stays with the component before it)."""
    parts: list[str] = []
    for p in path.split("."):
        if p.isdigit() and parts:
            parts[-1] += "." + p
        else:
            parts.append(p)
    return "/" + "/".join(parts) + "/" + op


def stem(name: str) -> str:
    """NVIDIA insert-lora's binding stem of a node name: '/' -> '.', drop the last component, drop the first
    character (contract §13.1)."""
    return name.replace("/", ".").rsplit(".", 1)[0][1:]


_TOPS = ("model", "transformer", "lm_head")  # the children of HF *ForCausalLM modules


def _unwrap(path: str) -> str:
    """Cut a wrapper's prefix before the model's own top module (our export wraps the model as `m`)."""
    parts = path.split(".")
    if parts[0] not in _TOPS:
        for i, p in enumerate(parts):
            if p in _TOPS:
                return ".".join(parts[i:])
    return path


def _from_weight(w) -> str | None:
    name = getattr(w, "name", "") or ""
    if not name.endswith(".weight") or "/" in name:
        return None
    return name[: -len(".weight")]


def is_linear(node: gs.Node) -> bool:
    """A MatMul with a constant 2-D weight and a computed input: what the runtime's GEMMs (and LoRA) take."""
    return (node.op == "MatMul" and len(node.inputs) == 2 and isinstance(node.inputs[1], gs.Constant)
            and len(node.inputs[1].shape) == 2 and not isinstance(node.inputs[0], gs.Constant))


def name_linears(graph: gs.Graph, paths: dict[str, str], lm_head: gs.Node | None) -> dict:
    """Rename every linear MatMul path-style (see module doc); lm_head is always `/lm_head/MatMul`.
    Returns {"named": n, "unnamed": [export names]}."""
    taken = {n.name for n in graph.nodes}
    named, unnamed = 0, []
    for node in [n for n in graph.nodes if is_linear(n) or n is lm_head]:
        if node is lm_head:
            path = "lm_head"
        elif _PATH_NODE.match(node.name or ""):
            path = stem(node.name)
        else:
            path = paths.get(node.name) or _from_weight(node.inputs[1])
        if not path:
            unnamed.append(node.name)
            continue
        new = node_name(_unwrap(path), node.op)
        k = 0
        while new in taken and new != node.name:  # two GEMMs of one module: keep names unique
            k += 1
            new = node_name(path, f"{node.op}_{k}")
        taken.discard(node.name)
        taken.add(new)
        node.name = new
        named += 1
    return {"named": named, "unnamed": unnamed}
