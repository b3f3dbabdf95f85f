"""verify of FP8 W8A8 folders (features/wa_quant.py): the fake-quantized twin, and the exact per-linear checks.

The end-to-end logits of an activation-quantized graph cannot meet the fp16 criterion against any twin: a
one-ulp fp16 difference in an activation (a different order of fp16 operations) moves it across an E4M3
rounding boundary now and then, a 1/16 step of that value, and over many layers these flips add up like a
second, independent draw of the quantization noise. Measured: the same twin run in fp16 and in fp32 differs by
cosine 0.999 on the 2-layer tiny Llama; on SmolLM2-135M (30 layers, calibrated scales) our folder and the
twin differ by cosine 0.945 at worst while the twin itself is 0.905 from the unquantized model at worst. So a
folder passes when

1. every FP8 linear, alone, is exact: its DequantizeLinear'd weight equals the model's Linear weight bit for
   bit (both are fp16(e4m3 * fp16(weight_scale)), the graph's from its bytes through the reference ops, the
   model's from the checkpoint), its input scale is the checkpoint's fp16(input_scale), and its activation
   quantizer (the graph's QuantizeLinear/DequantizeLinear on the reference) equals the twin's on `PROBES`
   values spanning its range, saturation included; and
2. end to end, the folder costs no more than the twin does: over all steps, the mean of 1 - cosine(ours,
   model) is at most `COST_RATIO` times the twin's mean 1 - cosine(twin, model), plus `COST_SLACK` (the model:
   the same weights without activation quantization). A wiring bug (a linear reading the wrong chain, a
   transposed weight) costs far more than quantization noise; a scale or weight bug fails 1.
The steps against the twin are printed for information.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_rewriter.errors import RewriteError
from onnx_rewriter.features import wa_calibrate, wa_checkpoint
from onnx_rewriter.features.wa_quant import WaLinear
from onnx_rewriter.reference import qdq
from onnx_rewriter.verification import nvfp4_a16_check as a16

log = logging.getLogger(__name__)

PROBES = 4096
KIND = {"fp8": "FP8", "int8_sq": "INT8-SQ", "nvfp4": "NVFP4", "mxfp8": "MXFP8", "w4a16_nvfp4": "NVFP4 weight-only"}
WEIGHT_ONLY = ("w4a16_nvfp4",)  # no activation quantizer
NO_INPUT_SCALE = ("mxfp8", "w4a16_nvfp4")  # MXFP8's activation scales are dynamic (E8M0 per 32 values)
COST_RATIO = 2.0
COST_SLACK = 0.002


def fake_quantize(x, s: float):
    """The twin's FP8 act(): fp16 x, e4m3(fp32 x / s) saturating at 448, times s rounded to fp16 (torch)."""
    import torch

    scale = torch.tensor(float(s), dtype=torch.float32)
    # the clamp is the contract's saturation; torch 2.13's cast saturates too (inf included), so it is not tested
    q = (x.to(torch.float16).float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(torch.float16).to(x.dtype)


def fake_quantize_int8(x, s: float, pqs=None):
    """The twin's INT8-SQ act(): fp16 x times pre_quant_scale (fp16), round_even(fp32 x' / s) clipped to int8,
    times s in fp32, then fp16 (torch)."""
    import torch

    xs = x.to(torch.float16)
    if pqs is not None:
        xs = xs * torch.from_numpy(np.array(pqs, np.float16))  # a copy: the graph's array is read-only
    scale = torch.tensor(float(s), dtype=torch.float32)
    q = torch.round(xs.float() / scale).clamp(-128.0, 127.0)
    return (q * scale).to(torch.float16).to(x.dtype)


def fake_quantize_nvfp4(x, s: float):
    """The twin's NVFP4 act() (contract part 3 16.4), in numpy on the codecs: per 16-block of the last axis of
    fp16 x, sx = e4m3(amax / (6 s)) and codes e2m1(x / (sx s)) (ties to even) with s the fp32 input scale;
    then d = fp16(sx * fp16(s)) and x = fp16(e2m1 * d), each product rounded once."""
    import torch

    from onnx_rewriter.reference import wa_codecs as C

    xn = x.detach().to(torch.float16).numpy()
    codes, sx = C.fp4_dynamic_quantize(xn, np.float32(s), ties="even")
    d = (C.e4m3_decode(sx).astype(np.float64) * np.float64(np.float16(np.float32(s)))).astype(np.float16)
    y = (C.e2m1_decode(codes).astype(np.float64) * np.repeat(d, C.FP4_BLOCK, axis=-1).astype(np.float64))
    return torch.from_numpy(y.astype(np.float16)).to(x.dtype)


def described(specs: dict) -> str:
    """What the twin quantizes, e.g. "FP8 activation", "FP8 + NVFP4 activation, NVFP4 weight-only"."""
    act = sorted({KIND[s.scheme] for s in specs.values() if s.scheme not in WEIGHT_ONLY})
    only = sorted({KIND[s.scheme] for s in specs.values() if s.scheme in WEIGHT_ONLY})
    return ", ".join(([f"{' + '.join(act)} activation"] if act else []) + only)


def fake_quantize_mxfp8(x):
    """The twin's MXFP8 act() in numpy on the codecs: per 32-block of the last axis of fp16 x, the E8M0 scale
    2^ceil(log2(amax / 448)) and e4m3(x / scale) (wa_codecs.mxfp8_quantize, inferred), then fp16(e4m3 * scale)."""
    import torch

    from onnx_rewriter.reference import wa_codecs as C

    codes, scales = C.mxfp8_quantize(x.detach().to(torch.float16).numpy())
    return torch.from_numpy(C.mxfp8_dequantize(codes, scales).astype(np.float16)).to(x.dtype)


def _act(spec: WaLinear):
    if spec.scheme in WEIGHT_ONLY:  # the input stays fp16
        return None
    if spec.scheme == "mxfp8":
        return fake_quantize_mxfp8
    if spec.scheme == "nvfp4":
        return lambda x: fake_quantize_nvfp4(x, float(spec.input_scale))
    if spec.scheme == "fp8":
        return lambda x: fake_quantize(x, float(spec.input_scale))
    return lambda x: fake_quantize_int8(x, float(spec.input_scale), spec.pre_quant_scale)


def _checkpoint(path):
    if path is None or not Path(path).is_dir():
        return None
    fmt = wa_checkpoint.detect(path)
    ok = fmt is not None and (fmt.scheme in KIND or fmt.scheme == "mixed")
    return wa_checkpoint.Checkpoint(path, fmt) if ok else None


def twin(oracle, specs: dict, checkpoint=None):
    """`oracle` (an HFOracle) turned into the fake-quantized twin: its model in fp16 (the graph's activations are
    fp16), each W+A linear's input through its act() with the graph's scales. An INT8-SQ linear gets the
    checkpoint's own weight (the graph multiplies the input by pre_quant_scale instead of the weight)."""
    import torch

    oracle.model = oracle.model.to(torch.float16)
    modules = dict(oracle.model.named_modules())
    ck = _checkpoint(checkpoint)
    for name, spec in specs.items():
        m = modules.get(name)
        if not isinstance(m, torch.nn.Linear):
            raise RewriteError(f"verify: the folder's quantized linear '{name}' is not a Linear of the model; was "
                               f"the folder made from this checkpoint?")
        if ck is None:  # an fp16 model (--quantize): its weights quantized as the folder's (features/wa_calibrate)
            w = wa_calibrate.twin_weight(spec.scheme, m.weight.detach().to(torch.float16).numpy(), spec.pre_quant_scale)
            m.weight = torch.nn.Parameter(torch.from_numpy(w).to(m.weight.dtype), requires_grad=False)  # untied
        elif a16.is_plugin(spec):  # Nvfp4A16GemmPlugin: its fp16 global scale (verification/nvfp4_a16_check.py)
            if ck.linears.get(name) != "w4a16_nvfp4":
                raise RewriteError(f"verify: the folder's Nvfp4A16GemmPlugin '{name}' needs --model to be the "
                                   f"W4A16_NVFP4 checkpoint it was made from")
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(a16.twin_weight(ck.linear(name))))
        elif spec.scheme == "int8_sq":
            if name not in ck.linears:
                raise RewriteError(f"verify: the folder's INT8-SQ linear '{name}' needs --model to be the INT8-SQ "
                                   f"checkpoint it was made from")
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(ck.linear(name).fp16_weight()))
        act = _act(spec)
        if act is not None:
            m.register_forward_pre_hook(lambda module, args, act=act: (act(args[0]),) + args[1:])
    log.info("activation quantization on: %s", ", ".join(specs))
    return oracle


def check_linears(out_dir, model, specs: dict, checkpoint=None, original=None) -> list[str]:
    """The exact per-linear checks (1. above) of the folder's W+A linears against the twin's `model` (and, given
    the `checkpoint` folder, each input scale and pre_quant_scale against its own; given an fp16 `original` model
    instead, each weight against the original's within the scheme's rounding, wa_calibrate.fidelity); one problem
    line per failure."""
    import torch

    ck = _checkpoint(checkpoint)
    graph = onnx.load(str(Path(out_dir) / "model.onnx"))  # with its weights: the stored codes are compared
    inits = {t.name: t for t in graph.graph.initializer}
    producer = {o: n for n in graph.graph.node for o in n.output}
    nodes = {n.name: n for n in graph.graph.node}
    modules = dict(model.named_modules())
    problems = []
    rng = np.random.default_rng(0)
    for name, spec in specs.items():
        kind = KIND[spec.scheme]
        if a16.is_plugin(spec):  # no DequantizeLinear: the plugin's bytes, unpacked, against the checkpoint's
            lin = ck.linear(name) if ck is not None and name in ck.linears else None
            problems += a16.check(name, nodes[spec.matmul], inits,
                                  modules[name].weight.detach().to(torch.float16).numpy(), lin)
            continue
        src = producer[nodes[spec.matmul].input[1]].input[0]  # the Transpose's input: [Cast] DequantizeLinear
        dqs = ("DequantizeLinear", "TRT_MXFP8DequantizeLinear")
        wdq = producer[src] if producer[src].op_type in dqs else producer[producer[src].input[0]]
        attrs = {a.name: a.i for a in wdq.attribute}
        axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
        if wdq.input[1] in inits:
            w_scale = numpy_helper.to_array(inits[wdq.input[1]])
        else:  # NVFP4: the blocked scale is DequantizeLinear(s_blk, s_g) of two initializers
            sdq = producer[wdq.input[1]]
            w_scale = qdq.dequantize_linear(numpy_helper.to_array(inits[sdq.input[0]]),
                                            numpy_helper.to_array(inits[sdq.input[1]]))
        w = numpy_helper.to_array(inits[wdq.input[0]])
        if wdq.op_type == "TRT_MXFP8DequantizeLinear":  # E8M0 scales, fp16 out
            graph_w = qdq.mxfp8_dequantize_linear(w, w_scale, axis=axis, block_size=block)
        else:
            graph_w = qdq.dequantize_linear(w, w_scale, axis=axis, block_size=block).astype(np.float16)
        model_w = modules[name].weight.detach().to(torch.float16).numpy()
        if graph_w.shape != model_w.shape or not np.array_equal(graph_w, model_w):
            bad = "shape" if graph_w.shape != model_w.shape else f"{int((graph_w != model_w).sum())} values"
            problems.append(f"{kind} linear {name}: the graph's dequantized weight differs from the model's ({bad})")
        if ck is None and original is not None:
            w0 = dict(original.named_modules())[name].weight.detach().to(torch.float16).numpy()
            bad = wa_calibrate.fidelity(spec.scheme, graph_w, w_scale, w0, spec.pre_quant_scale)
            if bad:
                problems.append(f"{kind} linear {name}: {bad} weights of the graph lie further from the fp16 "
                                f"model's than the quantization's rounding allows")
        if ck is not None:
            lin = ck.linear(name) if name in ck.linears else None
            if lin is None or lin.scheme != spec.scheme:  # MIXED_PRECISION: each linear in its own scheme
                problems.append(f"{kind} linear {name}: the checkpoint's is "
                                f"{'not quantized' if lin is None else KIND.get(lin.scheme, lin.scheme)}")
                continue
            # weight-only or dynamic (MXFP8): no input scale stored
            stored = None if spec.scheme in NO_INPUT_SCALE else lin.tensors["input_scale"].reshape(())
            if stored is not None and stored.astype(spec.input_scale.dtype) != spec.input_scale:
                problems.append(f"{kind} linear {name}: the graph's input scale {float(spec.input_scale)} is not "
                                f"the checkpoint's")
            pqs = lin.tensors.get("pre_quant_scale")
            if (pqs is None) != (spec.pre_quant_scale is None) or (
                    pqs is not None and not np.array_equal(np.asarray(pqs, np.float16).reshape(-1),
                                                           spec.pre_quant_scale)):
                problems.append(f"{kind} linear {name}: the graph's pre_quant_scale is not the checkpoint's")
        k = model_w.shape[1]
        if spec.scheme in WEIGHT_ONLY:
            continue
        if spec.scheme == "mxfp8":  # blocks of mixed magnitudes, fp16's whole range
            x = (rng.standard_normal((PROBES // k + 1, k)) * np.exp2(rng.integers(-14, 15, (PROBES // k + 1, k)))
                 ).astype(np.float16)
            ours = qdq.mxfp8_dequantize_linear(*qdq.mxfp8_dynamic_quantize(x))
        elif spec.scheme == "fp8":  # past 448 * s: saturation
            x = (rng.standard_normal(PROBES) * 300 * float(spec.input_scale)).astype(np.float16)
            ours = qdq.dequantize_linear(qdq.quantize_linear(x, spec.input_scale, output_dtype=qdq.FLOAT8E4M3FN),
                                         spec.input_scale)
        elif spec.scheme == "nvfp4":  # blocks of mixed magnitudes, past 6 * 448 * s: saturation of the block scale
            x = (rng.standard_normal((PROBES // k + 1, k)) * np.exp2(rng.integers(-12, 12, (PROBES // k + 1, k)))
                 * float(spec.input_scale)).astype(np.float16)
            xf4, sx = qdq.fp4_dynamic_quantize(x, spec.input_scale)
            d = qdq.dequantize_linear(sx, np.float16(spec.input_scale))
            ours = qdq.dequantize_linear(xf4, d, axis=-1, block_size=16)
        else:  # past 127 * s: saturation; the graph's Mul in fp16, then the fp32 Q/DQ, then the Cast
            pqs = spec.pre_quant_scale if spec.pre_quant_scale is not None else np.ones(k, np.float16)
            x = (rng.standard_normal((PROBES // k + 1, k)) * 200 * float(spec.input_scale)
                 / pqs.astype(np.float32)).astype(np.float16)
            xs = (x * pqs).astype(np.float32)
            ours = qdq.dequantize_linear(qdq.quantize_linear(xs, spec.input_scale, output_dtype=qdq.INT8),
                                         spec.input_scale).astype(np.float16)
        theirs = _act(spec)(torch.from_numpy(x)).numpy()
        if not np.array_equal(ours, theirs):
            problems.append(f"{kind} linear {name}: the graph's activation quantizer differs from the twin's on "
                            f"{int((ours != theirs).sum())} of {x.size} values")
    return problems


def check_kv_scales(graph_kv: list, checkpoint) -> list[str]:
    """The folder's FP8 KV scales (k, v per layer, features/fp8_kv.graph_scales) against the checkpoint's own
    `k_proj.k_scale` / `v_proj.v_scale` when `checkpoint` is a folder holding them, read here by
    wa_checkpoint (not by fp8_kv, which wrote them): the twin rounds its cache with the graph's scales, so a
    swapped or misplaced scale would pass the numbers unseen."""
    if not graph_kv or checkpoint is None or not Path(checkpoint).is_dir():
        return []
    fmt = wa_checkpoint.detect(checkpoint) or wa_checkpoint.Format("fp16", "unquantized checkpoint")
    stored = wa_checkpoint.Checkpoint(checkpoint, fmt).kv_scales()
    if not stored:
        return []
    problems = []
    for i, ours in enumerate(graph_kv):
        theirs = (stored.get((i, "k")), stored.get((i, "v")))
        if any(b is None or np.float32(a) != np.float32(b) for a, b in zip(ours, theirs)):
            problems.append(f"FP8 KV layer {i}: the graph's (k, v) scales {tuple(ours)} are not the checkpoint's "
                            f"{theirs}")
    return problems


def _mean_cost(steps) -> float:
    return float(np.mean([1.0 - s.cosine for s in steps])) if steps else float("nan")


def _label(result) -> str:
    q = result.quantized or ""
    if " activation" not in q:
        return "W4A16"
    act = q.split(" activation")[0]
    if "+" in act or q.startswith(act + " activation, "):
        return "mixed W+A"
    return "W4A4" if "NVFP4" in act else "W8A8"


def cost_line(result) -> str:
    ours, twin = _mean_cost(result.ours_vs_original), _mean_cost(result.quantization)
    worst = min(s.cosine for s in result.ours_vs_original)
    return (f"{_label(result)} cost vs the model without activation quantization: folder mean 1 - cosine {ours:.6f} "
            f"(min cosine {worst:.6f}), twin {twin:.6f}")


def judge(result) -> None:
    """The W+A pass rule (module docstring), on a VerifyResult whose problems hold the per-linear checks."""
    if _label(result) == "W4A16":  # no activation quantized: the fp16 rule against the twin, and the weights
        result.criterion += ("; every FP4 weight-only linear's weight equals the model's bit for bit (an "
                             "Nvfp4A16GemmPlugin's unpacked codes, block scales and global scale the checkpoint's)")
        result.passed = result.passed and not result.problems
        return
    ours, twin = _mean_cost(result.ours_vs_original), _mean_cost(result.quantization)
    result.criterion = (f"{_label(result)}: every quantized linear's weight equals the model's bit for bit, its "
                        f"input scale the checkpoint's and its activation quantizer the twin's on {PROBES} values; "
                        f"mean 1 - cosine vs the model <= {COST_RATIO:g} x the fake-quantized twin's + {COST_SLACK:g}")
    result.passed = (not result.problems and bool(result.ours_vs_original) and ours <= COST_RATIO * twin + COST_SLACK
                     and all(c.ok for c in result.rope_checks))
