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
from onnx_rewriter.features import wa_checkpoint
from onnx_rewriter.features.wa_quant import module_of
from onnx_rewriter.reference import qdq

log = logging.getLogger(__name__)

PROBES = 4096
COST_RATIO = 2.0
COST_SLACK = 0.002


def fake_quantize(x, s: float):
    """The twin's act(): fp16 x, e4m3(fp32 x / s) saturating at 448, times s rounded to fp16 (torch)."""
    import torch

    scale = torch.tensor(float(s), dtype=torch.float32)
    # the clamp is the contract's saturation; torch 2.13's cast saturates too (inf included), so it is not tested
    q = (x.to(torch.float16).float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(torch.float16).to(x.dtype)


def twin(oracle, scales: dict):
    """`oracle` (an HFOracle) turned into the fake-quantized twin: its model in fp16 (the graph's activations are
    fp16), each FP8 linear's input through fake_quantize with the graph's scale."""
    import torch

    oracle.model = oracle.model.to(torch.float16)
    modules = dict(oracle.model.named_modules())
    for name, s_in in scales.items():
        m = modules.get(name)
        if not isinstance(m, torch.nn.Linear):
            raise RewriteError(f"verify: the folder's FP8 linear '{name}' is not a Linear of the model; was the "
                               f"folder made from this checkpoint?")
        m.register_forward_pre_hook(lambda module, args, s=float(s_in): (fake_quantize(args[0], s),) + args[1:])
    log.info("FP8 activation quantization on: %s", ", ".join(scales))
    return oracle


def check_linears(out_dir, model, scales: dict, checkpoint=None) -> list[str]:
    """The exact per-linear checks (1. above) of the folder's FP8 linears against the twin's `model` (and, given
    the FP8 `checkpoint` folder, each input scale against its fp16(input_scale)); one problem line per failure."""
    import torch

    ck = None
    if checkpoint is not None and Path(checkpoint).is_dir():
        fmt = wa_checkpoint.detect(checkpoint)
        ck = wa_checkpoint.Checkpoint(checkpoint, fmt) if fmt is not None and fmt.scheme == "fp8" else None

    graph = onnx.load(str(Path(out_dir) / "model.onnx"))  # with its weights: the FP8 bytes are compared
    inits = {t.name: t for t in graph.graph.initializer}
    producer = {o: n for n in graph.graph.node for o in n.output}
    matmuls = {module_of(n.name): n for n in graph.graph.node if n.op_type == "MatMul"}
    modules = dict(model.named_modules())
    problems = []
    rng = np.random.default_rng(0)
    for name, s_in in scales.items():
        matmul = matmuls[name]
        transpose = producer[matmul.input[1]]
        wdq = producer[transpose.input[0]]
        w = numpy_helper.to_array(inits[wdq.input[0]])
        s_w = numpy_helper.to_array(inits[wdq.input[1]])
        graph_w = qdq.dequantize_linear(w, s_w)
        model_w = modules[name].weight.detach().to(torch.float16).numpy()
        if graph_w.shape != model_w.shape or not np.array_equal(graph_w, model_w):
            bad = "shape" if graph_w.shape != model_w.shape else f"{int((graph_w != model_w).sum())} values"
            problems.append(f"FP8 linear {name}: the graph's dequantized weight differs from the model's ({bad})")
        if ck is not None and (name not in ck.linears or np.float16(ck.linear(name).tensors["input_scale"]
                                                                  .reshape(())) != np.float16(s_in)):
            problems.append(f"FP8 linear {name}: the graph's input scale {float(s_in)} is not the checkpoint's "
                            f"fp16(input_scale)")
        x = (rng.standard_normal(PROBES) * 300 * float(s_in)).astype(np.float16)  # past 448 * s: saturation
        ours = qdq.dequantize_linear(qdq.quantize_linear(x, np.float16(s_in), output_dtype=qdq.FLOAT8E4M3FN),
                                     np.float16(s_in))
        theirs = fake_quantize(torch.from_numpy(x), float(s_in)).numpy()
        if not np.array_equal(ours, theirs):
            problems.append(f"FP8 linear {name}: the graph's activation quantizer differs from the twin's on "
                            f"{int((ours != theirs).sum())} of {PROBES} values")
    return problems


def _mean_cost(steps) -> float:
    return float(np.mean([1.0 - s.cosine for s in steps])) if steps else float("nan")


def cost_line(result) -> str:
    ours, twin = _mean_cost(result.ours_vs_original), _mean_cost(result.quantization)
    worst = min(s.cosine for s in result.ours_vs_original)
    return (f"FP8 W8A8 cost vs the model without activation quantization: folder mean 1 - cosine {ours:.6f} "
            f"(min cosine {worst:.6f}), twin {twin:.6f}")


def judge(result) -> None:
    """The W+A pass rule (module docstring), on a VerifyResult whose problems hold the per-linear checks."""
    ours, twin = _mean_cost(result.ours_vs_original), _mean_cost(result.quantization)
    result.criterion = (f"FP8 W8A8: every FP8 linear's weight equals the model's bit for bit, its input scale the "
                        f"checkpoint's and its activation quantizer the twin's on {PROBES} values; mean 1 - cosine vs "
                        f"the model <= {COST_RATIO:g} x the fake-quantized twin's + {COST_SLACK:g}")
    result.passed = (not result.problems and bool(result.ours_vs_original) and ours <= COST_RATIO * twin + COST_SLACK
                     and all(c.ok for c in result.rope_checks))
