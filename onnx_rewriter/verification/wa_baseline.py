"""verify --baseline of a W+A folder rewritten from a Q/DQ ONNX input (features/wa_onnx_in.py): the baseline
itself is the oracle (onnxruntime runs its Q/DQ, so the oracle computes the quantized model), and the baseline
with its activation Q/DQ pairs bypassed (the weights still dequantized) is the model without activation
quantization that the cost rule of verification/wa_check.py compares against.

onnxruntime's CPU QuantizeLinear to FLOAT8E4M3FN rounds and saturates as reference/wa_codecs.py does (the
contract's vectors and 200k random values, tests/test_wa_onnx_in.py), so the oracle's activation rounding is the
reference's. The folder's scales are the contract's casts of the baseline's (FP8 scales fp16), so its activation
codes may differ from the baseline's near a rounding boundary: the end-to-end rule is wa_check's (our cost vs the
unquantized-activation baseline at most COST_RATIO x the baseline's own + COST_SLACK), and the exact part is per
linear: its weight codes are the baseline's bit for bit, its scales and pre_quant_scale the baseline's cast as
the contract says.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_rewriter.features import wa_onnx_in
from onnx_rewriter.modelio import graph as graphio
from onnx_rewriter.verification import wa_check


def carries_qdq(path) -> bool:
    """Whether the ONNX file at `path` holds activation / weight Q/DQ pairs (not INT4's blocked weights)."""
    m = onnx.load(str(path), load_external_data=False)
    return any(n.op_type == "QuantizeLinear" or (n.op_type == "DequantizeLinear" and not any(
        a.name == "block_size" and a.i for a in n.attribute)) for n in m.graph.node)


def without_activation_qdq(path, folder: Path) -> Path:
    """A copy of the baseline at `path` in `folder` whose activation DequantizeLinear(QuantizeLinear(x)) pairs read x
    (weights keep theirs); its external data files linked, not copied."""
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    bypass = {}
    for n in m.graph.node:
        q = producer.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        x = q.input[0]
        if x in inits or (x in producer and producer[x].op_type == "Constant"):
            continue  # a weight's own Q/DQ (a fake-quantized weight): kept
        bypass[n.output[0]] = x
    for n in m.graph.node:
        n.input[:] = [bypass.get(i, i) for i in n.input]
    src = Path(path).parent
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location" and not (folder / e.value).exists():
                os.symlink((src / e.value).resolve(), folder / e.value)
    out = folder / Path(path).name
    onnx.save(m, str(out))
    return out


class BaselineOracles:
    """(the Q/DQ baseline, the baseline without activation Q/DQ) as verify's two onnxruntime oracles."""

    def __init__(self, baseline, onnx_oracle):
        self._tmp = tempfile.TemporaryDirectory(prefix="onnx_rewriter_wa_")
        # onnxruntime's QDQ fusions off: the oracle computes what the graph says (and can run FP8 pairs)
        self.oracle = onnx_oracle(baseline, qdq_fusions=False)
        self.original = onnx_oracle(str(without_activation_qdq(baseline, Path(self._tmp.name))), qdq_fusions=False)


def _codes_key(scheme: str, codes: np.ndarray) -> str:
    return hashlib.sha1(scheme.encode() + np.ascontiguousarray(codes).view(np.uint8).tobytes()).hexdigest()


def check_linears(out_dir, baseline, specs: dict) -> list[str]:
    """One problem line per W+A linear of the folder whose weight codes are not some baseline linear's bit for bit,
    or whose scales / pre_quant_scale are not that linear's cast as the contract says."""
    src = graphio.load(baseline)
    theirs = {}
    for lin in wa_onnx_in.convert(src.graph, src.base_dir).values():
        theirs.setdefault(_codes_key(lin.scheme, lin.tensors["weight"]), []).append(lin)
    model = onnx.load(str(Path(out_dir) / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    problems = []
    for name, spec in specs.items():
        kind = wa_check.KIND[spec.scheme]
        t = producer[nodes[spec.matmul].input[1]]  # Transpose <- [Cast] <- DequantizeLinear
        wdq = producer[t.input[0]]
        wdq = producer[wdq.input[0]] if wdq.op_type == "Cast" else wdq
        codes = numpy_helper.to_array(inits[wdq.input[0]])
        w_scale = numpy_helper.to_array(inits[wdq.input[1]])
        match = theirs.get(_codes_key(spec.scheme, codes))
        if not match:
            problems.append(f"{kind} linear {name}: its weight codes are no baseline linear's")
            continue
        ok = [lin for lin in match if _same_scales(lin, spec, w_scale)]
        if not ok:
            problems.append(f"{kind} linear {name}: its scales or pre_quant_scale are not those of the baseline "
                            f"linear holding its codes ('{match[0].module}')")
    return problems


def _same_scales(lin, spec, w_scale) -> bool:
    t = lin.tensors
    cast = np.float16 if spec.scheme == "fp8" else np.float32
    if np.asarray(t["input_scale"], np.float32).astype(cast).reshape(()) != np.asarray(spec.input_scale).reshape(()):
        return False
    if not np.array_equal(np.asarray(t["weight_scale"], np.float32).astype(cast).reshape(-1), w_scale.reshape(-1)):
        return False
    pqs = t.get("pre_quant_scale")
    if (pqs is None) != (spec.pre_quant_scale is None):
        return False
    return pqs is None or np.array_equal(np.asarray(pqs, np.float16).reshape(-1), spec.pre_quant_scale.reshape(-1))


def judge(result) -> None:
    """wa_check's W+A rule, its criterion naming the baseline instead of the twin and the checkpoint."""
    wa_check.judge(result)
    if result.criterion.startswith(("W8A8", "W4A4", "mixed")):
        label = result.criterion.split(":")[0]
        result.criterion = (f"{label} against the Q/DQ baseline: every quantized linear holds a baseline linear's "
                            f"codes bit for bit and its scales cast as the contract says; mean 1 - cosine vs the "
                            f"baseline without activation Q/DQ <= {wa_check.COST_RATIO:g} x the baseline's own + "
                            f"{wa_check.COST_SLACK:g}")
