"""verify can fail: graphs broken on purpose (RoPE halves swapped, positions shifted, window dropped)."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx_rewriter.cli import main
from onnx_rewriter.pipeline import steps as pipeline
from onnx_rewriter.verification.compare import compare
from onnx_rewriter.verification.llm import verify


def _rewire_rope(out, make_nodes):
    """Feed every plugin a transformed rope table: make_nodes(src, dst, R) -> (nodes, initializers)."""
    path = out / "model.onnx"
    model = onnx.load(str(path))
    r = [d.dim_value for d in next(i for i in model.graph.input if i.name == "rope_rotary_cos_sin")
         .type.tensor_type.shape.dim][-1]
    nodes, inits = make_nodes("rope_rotary_cos_sin", "rope_broken", r)
    for n in model.graph.node:
        if n.op_type == "AttentionPlugin":
            n.input[list(n.input).index("rope_rotary_cos_sin")] = "rope_broken"
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + rest)
    model.graph.initializer.extend(inits)
    onnx.save(model, str(path))


def _c(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def swap_halves(src, dst, r):
    return ([helper.make_node("Slice", [src, "h_lo", "h_mid", "h_ax"], ["rope_lo"]),
             helper.make_node("Slice", [src, "h_mid", "h_hi", "h_ax"], ["rope_hi"]),
             helper.make_node("Concat", ["rope_hi", "rope_lo"], [dst], axis=-1)],
            [_c("h_lo", [0]), _c("h_mid", [r // 2]), _c("h_hi", [r]), _c("h_ax", [-1])])


def shift_positions(src, dst, r):
    """Decode steps read row p+1 for position p (an off-by-one in the decode position rule).

    A shift of every position alike would change nothing: RoPE attention only sees differences.
    """
    return ([helper.make_node("Slice", [src, "s_start", "s_end", "s_ax"], ["rope_tail"]),
             helper.make_node("Slice", [src, "s_last", "s_end", "s_ax"], ["rope_last"]),
             helper.make_node("Concat", ["rope_tail", "rope_last"], ["rope_shifted"], axis=1),
             helper.make_node("Shape", ["inputs_embeds"], ["s_len"], start=1, end=2),
             helper.make_node("Equal", ["s_len", "s_one"], ["is_decode"]),
             helper.make_node("Where", ["is_decode", "rope_shifted", src], [dst])],
            [_c("s_start", [1]), _c("s_last", [-1]), _c("s_end", [1 << 30]), _c("s_ax", [1]), _c("s_one", [1])])


@pytest.fixture(scope="module")
def llama_ckpt(models):
    return str(models.checkpoint("llama"))


# shift_positions tells decode from prefill by the dense [B, S, H] input; the paged target is token-major.
@pytest.mark.parametrize("breaker,target,dtype", [
    (swap_halves, "edgellm-0.9", "float32"), (shift_positions, "edgellm-0.9", "float32"),
    (swap_halves, "edgellm-0.9", "float16"), (shift_positions, "edgellm-0.9", "float16"),
    (swap_halves, "edgellm-0.11", "float16"), (shift_positions, "edgellm-0.10", "float16")],
    ids=["halves-dense-fp32", "shift-dense-fp32", "halves-dense-fp16", "shift-dense-fp16", "halves-paged-fp16",
         "shift-010-fp16"])
def test_broken_rope_fails_verify(models, tmp_path, llama_ckpt, breaker, target, dtype):
    out = tmp_path / "out"
    pipeline.rewrite(models.baseline("llama"), out, target=target, dtype=dtype)
    assert verify(out, model=llama_ckpt, steps=2, quiet=True).passed
    _rewire_rope(out, breaker)
    res = verify(out, model=llama_ckpt, steps=2, quiet=True)
    assert not res.passed
    assert max(s.rel for s in res.steps) > 1e-2


def test_fp16_top1_rule_stays_on_as_the_error_grows():
    """A wrong top-1 fails fp16 verify however large the error; only a near-tie in the oracle excuses it."""
    ref = np.linspace(-1.0, 1.0, 64, dtype=np.float32)  # top-2 margin 0.032: 3% of max |logit|
    wrong = ref.copy()
    wrong[[-1, 0]] = wrong[[0, -1]]  # the best token scored worst: max abs error 2.0
    step = compare("decode1", wrong, ref)
    assert step.max_abs == pytest.approx(2.0) and step.top1_checked and not step.top1_agree
    tied = ref.copy()
    tied[-2] = ref[-1] - 5e-3  # oracle's top-2 within 0.5% of max |logit|: a flip is fp16 noise
    flipped = tied.copy()
    flipped[-2], flipped[-1] = tied[-1], tied[-2]
    step = compare("decode1", flipped, tied)
    assert not step.top1_checked and not step.top1_agree


def test_dropped_window_fails_verify(models, tmp_path):
    out = tmp_path / "out"
    pipeline.rewrite(models.baseline("mistral_window"), out, dtype="float32")
    ckpt = str(models.checkpoint("mistral_window"))
    assert verify(out, model=ckpt, steps=4, quiet=True).passed
    model = onnx.load(str(out / "model.onnx"))
    for n in model.graph.node:
        for a in n.attribute:
            if a.name == "sliding_window_size":
                assert a.i == 8
                a.i = -1
    onnx.save(model, str(out / "model.onnx"))
    assert not verify(out, model=ckpt, steps=4, quiet=True).passed


def test_verify_cli_is_fast_and_exits_by_result(models, tmp_path, capsys):
    out = tmp_path / "out"
    pipeline.rewrite(models.baseline("llama"), out, dtype="float32")
    t0 = time.perf_counter()
    assert main(["verify", str(out), "--model", str(models.checkpoint("llama"))]) == 0
    took = time.perf_counter() - t0
    printed = capsys.readouterr().out
    assert "verify PASSED" in printed and "decode8" in printed and "fp32" in printed
    assert took < 30, f"verify of a 2-layer model took {took:.1f}s"
    _rewire_rope(out, shift_positions)
    assert main(["verify", str(out), "--baseline", str(models.baseline("llama"))]) == 1
    assert "verify FAILED" in capsys.readouterr().out
