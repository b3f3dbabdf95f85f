"""FP8 KV cache (`--kv-cache fp8`, contract part 2 section 8): the AttentionPlugin stores K and V as
FLOAT8E4M3FN, `past_key_values_i` / `present_key_values_i` become FLOAT8E4M3FN (shapes unchanged), and
config.json says `"kv_cache_dtype": "fp8"`.

Scales are quant->orig, one per tensor per layer: the cache holds fp8(x / scale), attention reads
fp8 * scale (reference/fp8.py). They come from a ModelOpt checkpoint (`...k_proj.k_scale`,
`...v_proj.v_scale`; q_scale stays 1.0: it only feeds the FP8 FMHA path of SM 100+) or are calibrated:
amax / 448 of the roped K and of V per layer over a calibration set run through the baseline with
onnxruntime (features/calibration.py).

Per target (`PLANS`) the scales travel differently: 0.5 reads one extra last plugin input
`k_v_scale_quant_orig` fp32 [2]; 0.9, 0.10 and 0.11 read the `qkv_scales` attribute [q, k, v].
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from onnx_rewriter.features.base import Feature, FeatureOptions, check_choice, fp16_plan, option
from onnx_rewriter.features.calibration import calibrate_kv

from ..errors import RewriteError
from ..reference import fp8


@dataclass(frozen=True)
class Plan:
    scales: str  # "input": an extra last plugin input [k, v]; "attr": qkv_scales = [q, k, v]
    note: str = ""  # a warning every export to this target gets


PLANS = {
    "edgellm-0.5": Plan("input"),
    # 0.6.x wanted the 0.5-style input on the split plugin; one file cannot serve both.
    "edgellm-0.9": Plan("attr", "FP8 KV on edgellm-0.9 needs runtime >= 0.7 (0.6.x reads the scales as an input)"),
    "edgellm-0.10": Plan("attr", "FP8 KV on edgellm-0.10 runs on SM 89/100/101/110/120/121 only (0.11 adds SM 90)"),
    "edgellm-0.11": Plan("attr"),
}
REFUSALS = ("--kv-cache fp8", "has no FP8 KV cache", "the plugin's FP8 cache takes fp16 q/k/v")
CHUNKED_NOTE = ("chunked prefill with an FP8 KV cache needs an FMHA kernel that reads FP8 (CuTe DSL, SM 100/101/110 "
                "in runtime 0.9.1); elsewhere keep prefill in one chunk")


class Fp8KV(Feature):
    name = "fp8_kv"

    def __init__(self, calibration: str | None = None, scales_checkpoint: str | None = None):
        self.calibration = calibration  # a prompts file, one prompt a line; None: the bundled set
        self.scales_checkpoint = scales_checkpoint  # a ModelOpt checkpoint folder holding k_scale / v_scale

    def check(self, run, target) -> None:
        plan = fp16_plan(PLANS, target, run.options.dtype, *REFUSALS)
        self.plan = plan
        for note in filter(None, [plan.note, CHUNKED_NOTE]):
            run.warn(f"--kv-cache fp8: {note}")
        if self.scales_checkpoint:
            self.scales, self.source = checkpoint_scales(self.scales_checkpoint, len(run.layers)), "checkpoint"
        else:
            self.scales, self.source = calibrate_kv(run, self.calibration), "calibrated"

    def apply(self, run, build) -> None:
        g = build.graph
        plugins = {int(re.match(r"layers\.(\d+)/", n.name).group(1)): n for n in g.nodes if n.op == "AttentionPlugin"}
        if sorted(plugins) != list(range(len(self.scales))):
            raise RewriteError(f"--kv-cache fp8: {len(self.scales)} layers have scales, the graph has AttentionPlugin "
                               f"layers {sorted(plugins)}")
        for i, node in plugins.items():
            k, v = self.scales[i]
            node.attrs["enable_fp8_kv_cache"] = 1
            if self.plan.scales == "attr":
                node.attrs["qkv_scales"] = [1.0, k, v]
            else:
                node.inputs.append(gs.Constant(f"layers.{i}/attn/k_v_scale_quant_orig", np.array([k, v], np.float32)))
            for t in (node.inputs, node.outputs):
                cache = next(x for x in t if x.name in (f"past_key_values_{i}", f"present_key_values_{i}"))
                cache.dtype = fp8.E4M3
        run.report.features[self.name] = {"source": self.source, "scales": [list(s) for s in self.scales],
                                          "scales_in": "k_v_scale_quant_orig input" if self.plan.scales == "input"
                                          else "qkv_scales attribute"}

    def config(self, run, cfg: dict) -> None:
        cfg["kv_cache_dtype"] = "fp8"


def checkpoint_scales(folder, num_layers: int) -> list[tuple[float, float]]:
    """(k_scale, v_scale) per layer from a ModelOpt checkpoint's `model.layers.i.self_attn.k_proj.k_scale` /
    `...v_proj.v_scale` tensors (any prefix before `layers.i.`)."""
    from safetensors import safe_open

    found: dict = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "np") as st:
            for key in st.keys():
                m = re.search(r"layers\.(\d+)\..*(k_proj\.k_scale|v_proj\.v_scale)$", key)
                if m:
                    found[(int(m.group(1)), m.group(2)[0])] = float(np.asarray(st.get_tensor(key)).reshape(-1)[0])
    missing = [f"layer {i} {kv}_scale" for i in range(num_layers) for kv in "kv" if (i, kv) not in found]
    if missing:
        raise RewriteError(f"--kv-scales '{folder}': no {missing[0]} in its safetensors ({len(missing)} missing); "
                           f"give a ModelOpt FP8-KV checkpoint (k_proj.k_scale, v_proj.v_scale), or calibrate")
    scales = [(found[(i, "k")], found[(i, "v")]) for i in range(num_layers)]
    bad = [(i, s) for i, s in enumerate(scales) if not all(np.isfinite(x) and x > 0 for x in s)]
    if bad:
        raise RewriteError(f"--kv-scales '{folder}': layer {bad[0][0]} has scales {bad[0][1]}; they must be positive")
    return scales


def has_checkpoint_scales(folder) -> bool:
    """Whether a checkpoint folder holds ModelOpt KV scales (the export route then uses them)."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            if any(k.endswith("k_proj.k_scale") for k in st.keys()):
                return True
    return False


def graph_scales(model) -> list[tuple[float, float]]:
    """(k_scale, v_scale) per layer as a written graph holds them (attribute or 0.5 input), in layer order."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in (n for n in model.graph.node if n.op_type == "AttentionPlugin"):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if not attrs.get("enable_fp8_kv_cache"):
            continue
        if "qkv_scales" not in attrs:  # the 0.5 form (0.10's plugin also has 6 or 8 inputs: count no guide)
            out.append(tuple(float(x) for x in numpy_helper.to_array(inits[node.input[-1]])))
        else:
            out.append((float(attrs["qkv_scales"][1]), float(attrs["qkv_scales"][2])))
    return out


@dataclass
class Fp8KvOptions(FeatureOptions):
    kv_cache: str = option("fp16", "--kv-cache", "fp8: FP8 (E4M3) KV cache, scales from --kv-scales or calibrated "
                           "(amax/448 per layer)", choices=["fp16", "fp8"])
    kv_scales: str | Path | None = option(None, "--kv-scales", "ModelOpt checkpoint folder with k_proj.k_scale / "
                                          "v_proj.v_scale (default: calibrate on the baseline)", metavar="DIR")

    def enabled(self) -> bool:
        return self.kv_cache == "fp8"

    def validate(self, target, options) -> None:
        check_choice(self.kv_cache, "--kv-cache", ("fp16", "fp8"))
        if self.kv_scales is not None and not Path(self.kv_scales).is_dir():
            raise RewriteError(f"--kv-scales '{self.kv_scales}' is not a folder; give a ModelOpt checkpoint folder")
        if self.kv_scales is not None and self.kv_cache != "fp8":
            raise RewriteError("--kv-scales needs --kv-cache fp8")
        if self.kv_cache == "fp8":  # the target's refusals, before any work
            fp16_plan(PLANS, target, options.dtype, *REFUSALS)

    def feature(self, options) -> Fp8KV:
        return Fp8KV(options.calibration, self.kv_scales)
