"""verify of FP8 W8A8 folders (features/wa_quant.py): the fake-quantized twin, and the exact per-linear checks.

The end-to-end logits of an activation-quantized graph cannot meet the fp16 criterion against any twin: a
one-ulp fp16 difference in an activation (a different order of fp16 operations) moves it across an E4M3
rounding boundary now and then, a 1/16 step of that value. Measured on the tiny Llama: the same twin run in
fp16 and in fp32 differs by cosine 0.999. So a folder passes when

1. every FP8 linear, alone, is exact: its DequantizeLinear'd weight equals the model's Linear weight bit for
   bit (both are fp16(e4m3 * fp16(weight_scale)), the graph's from its bytes through the reference ops, the
   model's from the checkpoint), its input scale is the checkpoint's fp16(input_scale), and its activation
   quantizer (the graph's QuantizeLinear/DequantizeLinear on the reference) equals the twin's on `PROBES`
   values spanning its range, saturation included; and
2. the logits stay within cosine `WA_COSINE` of the twin's (the model, in fp16, each FP8 Linear's input
   fake-quantized with the graph's scale) at every step.
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

WA_COSINE = 0.99
PROBES = 4096


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
