"""Mixture-of-Experts decoders (issue 28; contract part 3 §15; docs/contract.md, "Mixture-of-Experts decoders").

The `Moe` feature is implied by the graph (a router: a Softmax read by a TopK). Each routed block the
`moe_block` pattern read (`MoeBlock`: router logits, tokens, stacked expert weights, E, k, I, renormalization)
becomes one `Fp16MoePlugin` node on `edgellm-0.11` (`[T, H]` hidden states) and `edgellm-0.10` (`[B, S, H]`, the
tokens' source before the block's Reshape; the plugin's output is reshaped back to `[T, H]`):

    Fp16MoePlugin(Cast(router_logits, FLOAT), x, fc1 [E, 2I, H], fc2 [E, H, I])

fc1 holds gate and up in the plugin's 64-row interleave starting with up (`layout.fp16_fc1`), fc2 is HF's
down_proj; both are computed at write time from the export's stacked weights. With --quantize int4 the block is an
`Int4MoePlugin` instead (`INT4_PLANS`: edgellm-0.9, 0.10, 0.11): experts by groupwise RTN into Marlin bytes
(`layout.pack_int4_experts`), and where the model does not renormalize, the output times the top-k mass.
`check` refuses, naming the layers, what the plugin cannot take (Fp16MoePlugin: E other than 128 / 256, k > 8; both:
H % 128, I % 64, an fp32 output), the FP8 KV cache, INT4 checkpoint experts, and the targets without a plan
(edgellm-0.5: no plugin; edgellm-0.9 without --quantize int4: Fp16MoePlugin only in runtime 0.9.1).
Other modules: ``layout`` (the bytes and row orders of both MoE plugins, GPTQ/AWQ experts) and ``support`` (plugins
per target, the refusals of MoE models before anything is loaded). The CPU reference is ``reference/moe.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.defs import OpSchema

from onnx_rewriter.errors import RewriteError, UnsupportedModel
from onnx_rewriter.features.base import Feature, FeatureOptions, option
from onnx_rewriter.features.int4 import layout as int4_layout
from onnx_rewriter.features.moe import dense, layout
from onnx_rewriter.features.moe.checkpoint import CheckpointExperts
from onnx_rewriter.features.moe.support import FP16_EXPERT_COUNTS
from onnx_rewriter.modelio.graph import computed_constant, constant_array, constant_row_blocks
from onnx_rewriter.modelio.normalize import replace_uses

# What each target writes for a routed block: the plugin and the rank of its hidden states; None: not wired yet.
# Runtimes up to 0.10 check hidden_states has rank 3 ([B, S, H], router rows B·S); 0.11 wants rank 2 ([T, H]).
PLANS = {
    "edgellm-0.9": ("Fp16MoePlugin", 3),  # runtime 0.9.1 only: written with a warning that says so
    "edgellm-0.10": ("Fp16MoePlugin", 3),
    "edgellm-0.11": ("Fp16MoePlugin", 2),
}
# With --quantize int4: Int4MoePlugin (runtime 0.6 on), experts quantized by groupwise RTN.
INT4_PLANS = {
    "edgellm-0.9": ("Int4MoePlugin", 3),
    "edgellm-0.10": ("Int4MoePlugin", 3),
    "edgellm-0.11": ("Int4MoePlugin", 2),
}


def int4_group(hidden: int, inter: int) -> int:
    """Int4MoePlugin's one group size for FC1 (K = H) and FC2 (K = I): 128 where both allow it, else 64."""
    return 128 if hidden % 128 == 0 and inter % 128 == 0 else 64


def rtn_experts(w: np.ndarray, group: int) -> tuple[list, list]:
    """Stacked expert weights [E, N, K] (HF's [out, in]) -> per expert (U [N, K], fp16 scales [K/G, N]) by the INT4
    feature's groupwise RTN (from the weights rounded to fp16)."""
    us, ss = [], []
    for e in range(w.shape[0]):
        u, sc = int4_layout.rtn(np.asarray(w[e], np.float16).astype(np.float32).T, group)
        us.append(u)
        ss.append(sc)
    return us, ss
# --moe-dense: no plugin, every expert computed (moe/dense.py); on the targets with MoE at all
DENSE_PLANS = {t: ("dense (no MoE plugin)", 2) for t in ("edgellm-0.9", "edgellm-0.10", "edgellm-0.11")}
WHY_NOT = {"edgellm-0.5": "runtimes 0.4/0.5 have no MoE plugin"}
# Contract §15.6: Mixtral maps onto Int4MoePlugin (w1 gate, w3 up, w2 down; softmax-top-k-renormalize) by inference
MIXTRAL = ("Mixtral: unvalidated on the runtime: its MoE blocks map onto the plugin like Qwen3-MoE's (w1 = gate, w3 = "
           "up, w2 = down, top-k renormalized), checked by verify on the CPU reference only; NVIDIA's exporter never "
           "writes Mixtral, so no EdgeLLM engine of it is known to have run")
FP16_ON_09 = ("Fp16MoePlugin on edgellm-0.9 needs runtime 0.9.1: the plugin does not exist in 0.6-0.9.0 (their engine "
              "build fails on the node); for any 0.6-0.9 runtime use --quantize int4 (Int4MoePlugin)")


def blocks(run) -> list:
    """(layer, MoeBlock) of every routed block matched, in graph order (layer = attention layers before it)."""
    from onnx_rewriter.analysis.moe import routers

    layer_of = {r.topk: r.layer for r in routers(run.source.graph)}
    found = [(layer_of.get(m.anchor.name, -1), m.result) for m in run.ctx.matches.get("moe", {}).values()]
    return sorted(found, key=lambda lb: lb[0])


def _rank3(x, hidden: int, layer: int):
    """The [B, S, H] tensor the block's [T, H] tokens are a Reshape of (runtimes <= 0.10 want rank 3)."""
    t = x
    while len(t.shape or ()) != 3:
        node = t.inputs[0] if len(t.inputs) == 1 else None
        if node is None or node.op != "Reshape":
            raise UnsupportedModel(f"layer {layer}: the MoE block's tokens '{x.name}' are not a Reshape of [B, S, H] "
                                   f"hidden states (Fp16MoePlugin before runtime 0.11 takes rank 3)")
        t = node.inputs[0]
    if t.shape[-1] != hidden:
        raise UnsupportedModel(f"layer {layer}: '{t.name}' is not [B, S, {hidden}]")
    return t


class Moe(Feature):
    name = "moe"

    def __init__(self):
        self.found: list = []  # (layer, MoeBlock), read in check (before the build removes the attention Softmaxes)
        self.tokens: dict = {}  # layer -> the plugin's hidden_states (found in check: the build drops shapes)

    def check(self, run, target) -> None:
        found = self.found = blocks(run)
        if not found:
            return
        name = str(target)
        int4 = [f for f in run.features if f.name == "int4"]
        self.int4 = bool(int4)
        if int4 and getattr(int4[0], "onnx_codes", None):
            raise UnsupportedModel("Mixture-of-Experts layers from an INT4 ONNX (MatMulNBits / blocked "
                                   "DequantizeLinear): their experts' own codes are not read into Int4MoePlugin, and "
                                   "re-quantizing them is not what the input means")
        # an AWQ / GPTQ checkpoint (set by export): its experts' own codes, exact or refused (moe/checkpoint.py)
        self.checkpoint = CheckpointExperts(int4[0].checkpoint) if int4 and int4[0].checkpoint else None
        self.dense = bool(getattr(run.options, "moe_dense", False))
        plans = DENSE_PLANS if self.dense else INT4_PLANS if self.int4 else PLANS
        if name not in plans:
            b = found[0][1]
            what = (f"{b.experts} experts, top-{b.top_k}, I = {b.inter}, top-k weights "
                    f"{'renormalized' if b.renormalize else 'not renormalized'}")
            raise UnsupportedModel(f"Mixture-of-Experts layers {', '.join(str(layer) for layer, _ in found)} ({what}) "
                                   f"cannot be written for {name}: {WHY_NOT.get(name, 'no MoE plugin plan for it')}"
                                   + ("; use --target edgellm-0.10 or edgellm-0.11" if b.experts in FP16_EXPERT_COUNTS
                                      else "; add --quantize int4 for Int4MoePlugin"))
        if any(f.name == "fp8_kv" for f in run.features):
            # measured: verify's tight check holds, but the FP8 cost check fails on the tiny Qwen3-MoE (min cosine 0.86
            # against the model): cache rounding moves the router logits enough to pick other experts
            raise UnsupportedModel("--kv-cache fp8 with Mixture-of-Experts layers is not offered: FP8 cache rounding "
                                   "flips expert choices (on the tiny Qwen3-MoE verify's FP8 cost check fails, min "
                                   "cosine 0.86 against the model); drop --kv-cache fp8")
        if run.options.dtype != "float16":
            raise UnsupportedModel(f"Mixture-of-Experts layers need --dtype float16: {plans[name][0]} computes "
                                   f"in fp16 only")
        for layer, b in found if not self.dense else ():  # the plugins' limits; the dense form has none
            bad = []
            if not self.int4 and b.experts not in FP16_EXPERT_COUNTS:
                bad.append(f"{b.experts} experts (Fp16MoePlugin takes {' or '.join(map(str, FP16_EXPERT_COUNTS))}; "
                           f"add --quantize int4 for Int4MoePlugin, or --moe-dense for the plugin-free form, "
                           f"E/k = {b.experts / b.top_k:g} times the expert compute)")
            if not self.int4 and b.top_k > 8:
                bad.append(f"top-{b.top_k} (at most 8)")
            if b.hidden % 128:
                bad.append(f"hidden size {b.hidden} (a multiple of 128)")
            if b.inter % 64:
                bad.append(f"expert width I = {b.inter} (a multiple of 64)")
            if bad:
                raise UnsupportedModel(f"layer {layer}: Mixture-of-Experts block cannot be an {plans[name][0]}: "
                                       + ", ".join(bad))
        self.groups = {layer: (self.checkpoint.check(layer, b) if self.checkpoint else int4_group(b.hidden, b.inter))
                       for layer, b in found} if self.int4 else {}
        rank = plans[name][1]
        self.tokens = {layer: b.x if rank == 2 else _rank3(b.x, b.hidden, layer) for layer, b in found}
        shapes = {(b.experts, b.top_k, b.inter) for _, b in found}
        if len(shapes) > 1:
            raise UnsupportedModel(f"Mixture-of-Experts layers differ in (experts, top-k, I): {sorted(shapes)}; "
                                   f"config.json has one set of MoE keys")
        run.report.features[self.name] = {"layers": [layer for layer, _ in found], "plugin": plans[name][0],
                                          "experts": found[0][1].experts, "top_k": found[0][1].top_k,
                                          "moe_intermediate_size": found[0][1].inter,
                                          "norm_topk_prob": found[0][1].renormalize}
        if self.dense:
            c = run.report.features[self.name]["dense_cost"] = dense.cost(found[0][1])
            run.warn(f"--moe-dense: Mixture-of-Experts layers {', '.join(str(x) for x, _ in found)} written without a "
                     f"MoE plugin, every expert computed: {c['factor']:g}x the expert compute of a plugin "
                     f"({c['dense_mflop_per_token']:g} vs {c['plugin_mflop_per_token']:g} MFLOP per token and "
                     f"layer) and every expert's weights read at each decode step ({c['dense_decode_mb_read']:g} vs "
                     f"at most {c['plugin_decode_mb_read']:g} MB per layer)")
        elif name == "edgellm-0.9" and not self.int4:
            run.warn(FP16_ON_09)
        if isinstance(run.hf_config, dict) and run.hf_config.get("model_type") == "mixtral":
            run.warn(MIXTRAL)
        if self.int4:
            run.report.features[self.name]["experts_from"] = (f"{self.checkpoint.method} checkpoint codes"
                                                              if self.checkpoint else "RTN")

    def apply(self, run, build) -> None:
        found = self.found
        if not found:
            return
        g = build.graph
        domain = next(n.domain for n in g.nodes if n.op == "AttentionPlugin")
        base_dir = run.source.base_dir
        for layer, b in found:
            prefix = f"/model/layers.{layer}/mlp/experts"
            router = b.router_logits.inputs[0] if len(b.router_logits.inputs) == 1 else None
            if router is None or router.op not in ("Gemm", "MatMul"):  # contract: the router stays an fp16 GEMM
                raise UnsupportedModel(f"layer {layer}: the MoE router is no longer a plain GEMM after the other "
                                       f"features ({router.op if router else 'none'}); the MoE plugin reads fp16 "
                                       f"router logits")
            logits = gs.Variable(f"{prefix}/router_logits_fp32", np.float32, b.router_logits.shape)
            g.nodes.append(gs.Node("Cast", f"{prefix}/router_logits_cast", attrs={"to": onnx.TensorProto.FLOAT},
                                   inputs=[b.router_logits], outputs=[logits]))
            x = self.tokens[layer]
            if x.dtype != np.float16:
                x16 = gs.Variable(f"{prefix}/hidden_fp16", np.float16, b.x.shape)
                g.nodes.append(gs.Node("Cast", f"{prefix}/hidden_cast", attrs={"to": onnx.TensorProto.FLOAT16},
                                       inputs=[x], outputs=[x16]))
                x = x16
            i, e, h = b.inter, b.experts, b.hidden

            def fc1(w=b.gate_up, i=i):  # one fp16 expert at a time, from the source to the writer
                return (layout.fp16_fc1(a[:i], a[i:])[None] for a in expert_blocks(w, base_dir))

            def fc2(w=b.down):
                return (a[None] for a in expert_blocks(w, base_dir))

            if self.dense:
                replace_uses(g, b.out, dense.emit(g, prefix, b, x, base_dir))
                continue
            op = "Int4MoePlugin" if self.int4 else "Fp16MoePlugin"
            out = gs.Variable(f"{prefix}/{op}_out", np.float16, None)
            if self.int4:
                inputs, attrs = self._int4_inputs(layer, b, prefix, base_dir)
            else:
                inputs = [computed_constant(f"{prefix}.fc1_weights", np.float16, (e, 2 * i, h), fc1),
                          computed_constant(f"{prefix}.fc2_weights", np.float16, (e, h, i), fc2)]
                attrs = {"activation_type": 2, "norm_topk_prob": int(b.renormalize), "max_routed_rows": 0}
            g.nodes.append(gs.Node(
                op, f"{prefix}/{op}", domain=domain, inputs=[logits, x, *inputs], outputs=[out],
                attrs={"num_experts": e, "top_k": b.top_k, "hidden_size": h, "moe_inter_size": i, **attrs}))
            if x is not b.x:  # [B, S, H] -> the block's [T, H], which the export reshapes back itself
                flat = gs.Variable(f"{prefix}/{op}_tokens", np.float16, None)
                g.nodes.append(gs.Node("Reshape", f"{prefix}/{op}_reshape",
                                       inputs=[out, gs.Constant(f"{prefix}/tokens_shape", np.array([-1, h], np.int64))],
                                       outputs=[flat]))
                out = flat
            if self.int4 and not b.renormalize:
                out = _topk_mass(g, prefix, logits, b.top_k, out)
            replace_uses(g, b.out, out)
        g.cleanup(remove_unused_graph_inputs=False).toposort()

    def _int4_inputs(self, layer: int, b, prefix: str, base_dir) -> tuple[list, dict]:
        """Int4MoePlugin's four expert inputs (Marlin bytes and scales, computed at write time) and attributes: the
        checkpoint's own codes where there is one, else groupwise RTN of the traced experts."""
        e, h, i = b.experts, b.hidden, b.inter
        group = self.groups[layer]
        cache: dict = {}

        scales: dict = {}  # RTN: part -> the scales made while its qweights streamed, for the writer's next read

        def rtn_part(k):
            """Part k (0, 2: qweights; 1, 3: scales) of RTN experts, one expert at a time from the source to the
            writer: qweights and scales come out of the same quantization, so the scales made while the
            qweights stream are kept (small) for their own read; read first, they are made by a pass of their own."""
            w, which = (b.gate_up, 0) if k < 2 else (b.down, 2)
            if k % 2 and which in scales:
                yield from scales.pop(which)
                return
            kept = scales.setdefault(which, []) if k % 2 == 0 and which not in read_first else None
            if k % 2:
                read_first.add(which)
            for a in expert_blocks(w, base_dir):
                packed = layout.pack_int4_experts(*rtn_experts(a[None], group))
                if kept is not None:
                    kept.append(packed[1])
                yield packed[k % 2]

        read_first: set = set()

        def part(k):
            if self.checkpoint is None:
                return rtn_part(k)
            if not cache:
                gu = constant_array(b.gate_up, base_dir)  # [E, 2I, H]: gate rows, then up = the plugin's order
                dn = constant_array(b.down, base_dir)  # [E, H, I]
                cache.update(enumerate(self.checkpoint.packed(layer, b, group, gu, dn)))
            return cache.pop(k)

        inputs = [computed_constant(f"{prefix}.fc_gate_up_qweights", np.int8, (e, h // 16, 16 * i), lambda: part(0)),
                  computed_constant(f"{prefix}.fc_gate_up_scales", np.float16, (e, h // group, 2 * i), lambda: part(1)),
                  computed_constant(f"{prefix}.fc_down_qweights", np.int8, (e, i // 16, 8 * h), lambda: part(2)),
                  computed_constant(f"{prefix}.fc_down_scales", np.float16, (e, i // group, h), lambda: part(3))]
        return inputs, {"activation_type": 0, "quantization_group_size": group}

    def config(self, run, cfg: dict) -> None:
        found = self.found
        if found:
            b = found[0][1]
            cfg.update(num_experts=b.experts, num_experts_per_tok=b.top_k, moe_intermediate_size=b.inter,
                       enable_moe_block=False)

    def schemas(self) -> list:
        ints = {a: OpSchema.AttrType.INT for a in ("num_experts", "top_k", "hidden_size", "moe_inter_size",
                                                     "activation_type", "norm_topk_prob", "max_routed_rows")}
        int4 = {a: OpSchema.AttrType.INT for a in ("num_experts", "top_k", "hidden_size", "moe_inter_size",
                                                     "activation_type", "quantization_group_size")}
        return [("Fp16MoePlugin", ["router_logits", "hidden_states", "fc1_weights", "fc2_weights"], ["output"],
                 ints),
                ("Int4MoePlugin", ["router_logits", "hidden_states", "fc_gate_up_qweights", "fc_gate_up_scales",
                                   "fc_down_qweights", "fc_down_scales"], ["output"], int4)]


def expert_blocks(w, base_dir):
    """One expert's fp16 weight [N, K] at a time, read from the source (constant_row_blocks): what the writer
    streams expert by expert (stream.produce_blocks), so the peak is one expert, not the layer."""
    for _, block in constant_row_blocks(w, base_dir, 1):
        yield block[0]


def _topk_mass(g, prefix: str, logits, k: int, out):
    """out [T, H] * fp16(sum of the top-k softmax probabilities) [T, 1]: Int4MoePlugin always renormalizes, so a
    model that does not (norm_topk_prob false, Qwen2-MoE) gets the mass back (contract §15.6; linear in the
    weights, exact up to fp16 rounding)."""
    def var(name, dtype):
        return gs.Variable(f"{prefix}/{name}", dtype, None)

    p, vals, idx, mass, mass16, scaled = (var("topk_mass_softmax", np.float32), var("topk_mass_values", np.float32),
                                          var("topk_mass_indices", np.int64), var("topk_mass", np.float32),
                                          var("topk_mass_fp16", np.float16), var("Int4MoePlugin_scaled", np.float16))
    g.nodes += [
        gs.Node("Softmax", f"{prefix}/topk_mass_softmax", attrs={"axis": -1}, inputs=[logits], outputs=[p]),
        gs.Node("TopK", f"{prefix}/topk_mass_topk", attrs={"axis": -1},
                inputs=[p, gs.Constant(f"{prefix}/topk_k", np.array([k], np.int64))], outputs=[vals, idx]),
        gs.Node("ReduceSum", f"{prefix}/topk_mass_sum", attrs={"keepdims": 1},
                inputs=[vals, gs.Constant(f"{prefix}/topk_axes", np.array([-1], np.int64))], outputs=[mass]),
        gs.Node("Cast", f"{prefix}/topk_mass_cast", attrs={"to": onnx.TensorProto.FLOAT16}, inputs=[mass],
                outputs=[mass16]),
        gs.Node("Mul", f"{prefix}/Int4MoePlugin_scale", inputs=[out, mass16], outputs=[scaled])]
    return scaled


@dataclass
class MoeOptions(FeatureOptions):
    """The MoE feature is implied by a router in the graph; its one option chooses the plugin-free form."""

    moe_dense: bool = option(False, "--moe-dense", "Mixture-of-Experts blocks without a MoE plugin: every expert "
                             "computed and weighted by its top-k routing weight (E/k times the expert compute; for "
                             "FP16 experts no plugin takes, e.g. Qwen2-MoE's 60)", action="store_true")

    def validate(self, target, options) -> None:
        if self.moe_dense and getattr(options, "quantize", None):
            raise RewriteError("--moe-dense writes FP16 experts without a plugin; with --quantize int4 the experts "
                               "are an Int4MoePlugin (any expert count): drop one of the two")


# ---------------------------------------------------------------------- verify: the same numbers in transformers


def int4_moe_nodes(model) -> list[tuple[int, int]]:
    """(layer, quantization_group_size) of every Int4MoePlugin node (named /model/layers.{i}/mlp/experts/...)."""
    import re

    out = []
    for n in model.graph.node:
        if n.op_type == "Int4MoePlugin":
            m = re.match(r"/model/layers\.(\d+)/mlp/experts/", n.name)
            group = next(a.i for a in n.attribute if a.name == "quantization_group_size")
            out.append((int(m.group(1)) if m else -1, int(group)))
    return out


def load_dequantized_experts(hf_model, nodes) -> list[str]:
    """Put into each layer's transformers experts the RTN-dequantized weights its Int4MoePlugin should hold, computed
    from the model's own gate_up_proj / down_proj (never from the packed bytes, so a packing bug fails verify)."""
    import torch

    done = []
    modules = dict(hf_model.named_modules())
    for layer, group in nodes:
        name = next((k for k in modules if k.endswith(f"layers.{layer}.mlp.experts")), None)
        experts = modules.get(name)
        if experts is None or not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
            raise UnsupportedModel(f"verify: no stacked experts (gate_up_proj, down_proj) at layer {layer} of the "
                                   f"model; was the folder made from this model?")
        for pname in ("gate_up_proj", "down_proj"):
            p = getattr(experts, pname)
            w = p.detach().float().numpy()  # [E, N, K]
            deq = np.stack([int4_layout.dequantize(u, sc, group) for u, sc in zip(*rtn_experts(w, group))])
            with torch.no_grad():
                p.copy_(torch.from_numpy(deq.astype(np.float32)))
        done.append(name)
    return done
