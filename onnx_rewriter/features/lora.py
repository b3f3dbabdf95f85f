"""LoRA slots (`--lora`): every decoder linear gets run-time adapter inputs, `y + (x·A)·B`.

What NVIDIA's `tensorrt-edgellm-insert-lora` adds, so an engine built from our folder binds adapters the
runtime's way (by exact name; an unbound slot gets a rank-0 dummy): for the linear named
`/model/layers.{i}/self_attn/q_proj/MatMul` (linear_names.py), binding stem L = `model.layers.{i}.self_attn.q_proj`:

- graph inputs `L.lora_A.weight` `[K, "L.rank"]` and `L.lora_B.weight` `["L.rank", N]` (the output float
  type: fp16 for the runtime), rank dynamic per linear;
- `{g}/lora_matmul_A` (MatMul x, A) -> `{g}/lora_mid`, `{g}/lora_matmul_B` -> `{g}/lora_gemm_out`,
  `{g}/lora_add` (y + that) -> `{g}/lora_add_output`, read by every former reader of y (g = the GEMM's name).

Eligible: MatMuls with a constant `[K, N]` weight and the INT4 GEMM plugins, except lm_head, on every
target (the runtime binds LoRA on 0.5, 0.9, 0.10 and 0.11). Adapters come from PEFT as NVIDIA's
`tensorrt-edgellm-process-lora` converts them (reference/lora.py). q/k/v and gate/up stay separate
MatMuls under --lora (LoraOptions.imply), so each has its own slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from onnx_rewriter.features.base import Feature, FeatureOptions, option
from onnx_rewriter.modelio.normalize import replace_uses

from ..errors import UnsupportedModel
from ..linear_names import is_linear, stem

# 0.10: yes (contract 3 §17.5; its insert-lora matches MatMul only, not Gemm: our slots sit on MatMuls)
TARGETS = ("edgellm-0.5", "edgellm-0.9", "edgellm-0.10", "edgellm-0.11")
INT4_OPS = ("Int4GroupwiseGemmPlugin", "Int4GroupwiseGemmPluginV2")


@dataclass
class LoraOptions(FeatureOptions):
    lora: bool = option(False, "--lora", "LoRA inputs (dynamic rank) on every linear but lm_head, bound to adapters "
                        "at run time", action="store_true")

    def enabled(self) -> bool:
        return bool(self.lora)

    def imply(self, options) -> None:
        options.fuse_qkv = False  # LoRA binds per projection (q, k, v, gate, up): they stay separate MatMuls

    def feature(self, options) -> Lora:
        return Lora()


def _gemm(node: gs.Node):
    """(x, K, N) of a GEMM LoRA attaches to, or None."""
    if node.op in INT4_OPS:
        # act-order permutes the plugin's input and AWQ scales it (pre_quant_scale); LoRA's A reads the
        # layer's own x
        x = node.inputs[0]
        while x.inputs and (x.inputs[0].op, x.inputs[0].name.rsplit("/", 1)[-1]) in (
                ("Gather", "act_order"), ("Mul", "pre_quant_scale_mul")):
            x = x.inputs[0].inputs[0]
        return x, int(node.attrs["gemm_k"]), int(node.attrs["gemm_n"])
    if is_linear(node):
        k, n = (int(d) for d in node.inputs[1].shape)
        return node.inputs[0], k, n
    return None


def is_path_name(name: str) -> bool:
    """A path-style GEMM name whose stem names a module (not an export's `node_MatMul_9`)."""
    return name.startswith("/") and name.count("/") >= 3


class Lora(Feature):
    name = "lora"

    def check(self, run, target) -> None:
        if target.name not in TARGETS:
            raise UnsupportedModel(f"--lora: target {target.name} cannot bind LoRA adapters")

    def apply(self, run, build) -> None:
        g = build.graph
        np_float = onnx.helper.tensor_dtype_to_np_dtype(build.float_type)
        slots, skipped, seen = [], [], set()
        for node in list(g.nodes):
            gemm = _gemm(node)
            if gemm is None or "lm_head" in stem(node.name or "/"):
                continue
            if not is_path_name(node.name or ""):
                skipped.append({"node": node.name, "reason": "no module name (the export lost it)"})
                continue
            lstem = stem(node.name)
            if lstem in seen:
                skipped.append({"node": node.name, "reason": f"a second GEMM of module {lstem}"})
                continue
            seen.add(lstem)
            x, k, n = gemm
            self._attach(g, node, x, k, n, lstem, np_float)
            slots.append({"binding": lstem, "node": node.name, "K": k, "N": n})
        if not slots:
            raise UnsupportedModel("--lora: no linear has a module name to bind an adapter to "
                                   f"({skipped[0]['node'] if skipped else 'no MatMul with a constant weight'})")
        if skipped:
            run.warn(f"--lora: {len(skipped)} linears get no LoRA inputs (first: {skipped[0]['node']}: "
                     f"{skipped[0]['reason']}); the report lists each")
        run.report.features[self.name] = {"slots": slots, "skipped": skipped}

    @staticmethod
    def _attach(g: gs.Graph, node: gs.Node, x, k: int, n: int, lstem: str, np_float) -> None:
        base = node.name
        rank = f"{lstem}.rank"
        a = gs.Variable(f"{lstem}.lora_A.weight", np_float, [k, rank])
        b = gs.Variable(f"{lstem}.lora_B.weight", np_float, [rank, n])
        y = node.outputs[0]
        shape = list(y.shape) if y.shape is not None else None
        mid = gs.Variable(f"{base}/lora_mid", np_float, shape[:-1] + [rank] if shape else None)
        delta = gs.Variable(f"{base}/lora_gemm_out", np_float, shape)
        out = gs.Variable(f"{base}/lora_add_output", np_float, shape)
        replace_uses(g, y, out)  # before the Add exists: it alone keeps reading y
        g.nodes += [gs.Node("MatMul", name=f"{base}/lora_matmul_A", inputs=[x, a], outputs=[mid]),
                    gs.Node("MatMul", name=f"{base}/lora_matmul_B", inputs=[mid, b], outputs=[delta]),
                    gs.Node("Add", name=f"{base}/lora_add", inputs=[y, delta], outputs=[out])]
        g.inputs += [a, b]
