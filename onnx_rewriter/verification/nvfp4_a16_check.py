"""verify of W4A16_NVFP4 linears written as ``Nvfp4A16GemmPlugin`` (features/wa_quant.py `_emit_a16`).

The plugin's weight is e2m1 * e4m3 * fp16(weight_scale_2 * 2^7) / 2^7 (reference/nvfp4_a16.py): its global scale
is rounded to fp16, so it is not the fp32-scaled weight of the 16.4 DequantizeLinear form. The twin gets that
weight (from the checkpoint, rounded to fp16 as its Linear holds it), and each plugin, alone, is checked exactly:
its bytes unpacked by the reference (not by the packer) are the checkpoint's codes and E4M3 block scales, the rows
past N are zero, its global scale is fp16(weight_scale_2 * 2^7), its gemm_n / gemm_k fit, and the weight it
computes, rounded to fp16, equals the twin's bit for bit.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from onnx_rewriter.reference import nvfp4_a16 as ref
from onnx_rewriter.reference import wa_codecs

OP = "Nvfp4A16GemmPlugin"
SHIFT = 2.0 ** 7  # the contract's, kept apart from the reference's own so that a bug there shows


def is_plugin(spec) -> bool:
    return spec.matmul.endswith(f"/{OP}")


def checkpoint_global_scale(lin) -> np.ndarray:
    """fp16 [1] = fp16(weight_scale_2 * 2^7) of a checkpoint linear (contract part 3 16.5), the product in float64."""
    return np.array([np.float64(np.float32(lin.tensors["weight_scale_2"].reshape(-1)[0])) * SHIFT], np.float16)


def twin_weight(lin) -> np.ndarray:
    """fp16 [N, K]: the weight the plugin computes from this checkpoint linear, rounded once to fp16 (written here
    from the contract, not through the reference's dequantize, so that a reference bug does not reach the twin)."""
    g = np.float64(checkpoint_global_scale(lin)[0]) / SHIFT
    step = wa_codecs.e4m3_decode(lin.tensors["weight_scale"]).astype(np.float64) * g
    codes = wa_codecs.e2m1_decode(wa_codecs.unpack_fp4(lin.tensors["weight"])).astype(np.float64)
    return (codes * np.repeat(step, wa_codecs.FP4_BLOCK, axis=-1)).astype(np.float16)


def check(name: str, node, inits: dict, model_w: np.ndarray, lin) -> list[str]:
    """One plugin node against the checkpoint linear `lin` and the twin's fp16 weight `model_w`; problem lines."""
    where = f"NVFP4 weight-only linear {name} ({OP})"
    if lin is None or lin.scheme != "w4a16_nvfp4":
        return [f"{where}: the checkpoint's is {'not quantized' if lin is None else lin.scheme}"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n, k = lin.shape
    n_p = -(-n // ref.N_ALIGN) * ref.N_ALIGN
    if (attrs.get("gemm_n"), attrs.get("gemm_k"), attrs.get("max_m")) != (n_p, k, 0):
        return [f"{where}: gemm_n / gemm_k / max_m = {attrs.get('gemm_n')} / {attrs.get('gemm_k')} / "
                f"{attrs.get('max_m')}, expected {n_p} / {k} / 0"]
    if any(i not in inits for i in node.input[1:4]):
        return [f"{where}: its weight inputs are not initializers"]
    q, s, g = (numpy_helper.to_array(inits[i]) for i in node.input[1:4])
    try:
        codes, scales = ref.unpack(q, s, n_p, k)
    except ValueError as exc:
        return [f"{where}: {exc}"]
    problems = []
    if not np.array_equal(codes[:n], wa_codecs.unpack_fp4(lin.tensors["weight"])):
        problems.append(f"{where}: {int((codes[:n] != wa_codecs.unpack_fp4(lin.tensors['weight'])).sum())} E2M1 "
                        f"codes differ from the checkpoint's")
    if not np.array_equal(scales[:n], lin.tensors["weight_scale"]):
        problems.append(f"{where}: {int((scales[:n] != lin.tensors['weight_scale']).sum())} E4M3 block scales "
                        f"differ from the checkpoint's")
    if codes[n:].any() or scales[n:].any():
        problems.append(f"{where}: the padding rows {n}..{n_p} are not zero")
    want = checkpoint_global_scale(lin)
    if g.dtype != np.float16 or g.shape != (1,) or g.view(np.uint16)[0] != want.view(np.uint16)[0]:
        problems.append(f"{where}: global scale {g.tolist()} ({g.dtype}), expected fp16(weight_scale_2 * 2^7) = "
                        f"{float(want[0])}")
    if not problems:
        graph_w = ref.dequantize(codes[:n], scales[:n], g).astype(np.float16)
        if graph_w.shape != model_w.shape or not np.array_equal(graph_w, model_w):
            problems.append(f"{where}: the plugin's weight differs from the model's")
    return problems
