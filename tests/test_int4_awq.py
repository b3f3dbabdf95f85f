"""--int4-method awq: activation-aware power-of-two channel scales, searched on calibration activations, a
pre_quant_scale Mul before each plugin; verify rebuilds the same weights; on a model with salient channels
it beats RTN on held-out prompts."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from safetensors.numpy import load_file, save_file

from onnx_rewriter.errors import RewriteError
from onnx_rewriter.features.int4 import awq as int4_awq
from onnx_rewriter.features.int4 import layout as int4_layout
from onnx_rewriter.pipeline import steps as pipeline
from onnx_rewriter.verification.llm import verify

DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8)


def test_search_keeps_salient_channels_and_never_loses_to_rtn():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 64)) * 0.05).astype(np.float16)
    x = rng.standard_normal((200, 256)).astype(np.float32)
    x[:, [3, 77, 130]] *= 30  # salient input channels
    s, alpha, rtn_err, err = int4_awq.search(w, np.abs(x).mean(0), x)
    assert alpha > 0 and err < 0.8 * rtn_err
    assert np.array_equal(np.exp2(np.rint(np.log2(s))), s) and s[[3, 77, 130]].min() > np.median(s)
    # exact fold: (x / s) reads what x reads, diag(s) W is W scaled by powers of two
    u, scales = int4_awq.quantize(w, s)
    np.testing.assert_array_equal((w.astype(np.float32) * s[:, None]).astype(np.float16) / s[:, None].astype(
        np.float16), w)
    assert np.array_equal(int4_awq.quantize(w, np.ones(256, np.float32))[1], int4_layout.rtn(w)[1])
    # uniform activations: RTN (alpha 0) is kept when nothing beats it
    flat = rng.standard_normal((200, 256)).astype(np.float32)
    assert int4_awq.search(w, np.ones(256), flat)[3] <= int4_awq.search(w, np.ones(256), flat)[2]


def test_search_trials_hold_exactly_the_quantized_weights():
    """The search's fused quantize-dequantize (onnxruntime casts, [K, N] order) gives the very values the
    written codes dequantize to, so the choice is the one the codes make."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((384, 192)) * 0.05).astype(np.float16)
    w[:128, :5] = 0  # all-zero groups (scale 1)
    w[128:, 7] = 3e-7  # fp16 subnormals
    w[rng.integers(0, 384, 30), rng.integers(0, 192, 30)] = 2.5
    for alpha in (0.0, 0.5, 1.0):
        s = int4_awq.pow2_scales(rng.random(384) * 10 + 1e-3, alpha)
        want = int4_layout.dequantize(*int4_awq.quantize(w, s)).astype(np.float32).T
        got = int4_awq.quantized_values(w.astype(np.float32), s)
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.fixture(scope="module")
def salient(models, tmp_path_factory):
    """A tiny Qwen2 whose RMSNorm gammas carry 4 channels x 20 (the outlier channels real LLMs have), and its
    baseline export."""
    from onnx_rewriter.hf.export import export_baseline, load_model

    root = tmp_path_factory.mktemp("salient")
    ck, base = root / "ck", root / "base"
    shutil.copytree(models.checkpoint("qwen2", **DIMS), ck)
    state = load_file(str(ck / "model.safetensors"))
    rng = np.random.default_rng(0)
    for key in [k for k in state if k.endswith("layernorm.weight")]:
        state[key] = state[key].copy()
        state[key][rng.choice(len(state[key]), 4, replace=False)] *= 20
    save_file(state, str(ck / "model.safetensors"))
    base.mkdir()
    export_baseline(load_model(str(ck), torch_dtype="float32")[0], base / "model.onnx")
    models.copy_side_files(ck, base)
    return ck, base / "model.onnx"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the x20 channels overflow exp() in the reference's SiLU
def test_awq_verifies_and_beats_rtn_on_held_out_prompts(salient, tmp_path):
    ck, base = salient
    costs = {}
    for method in ("rtn", "awq"):
        out = tmp_path / method
        run = pipeline.rewrite(base, out, target="edgellm-0.9", quantize="int4", int4_method=method)
        res = verify(out, model=str(ck), steps=2, quiet=True)
        assert res.passed, res.table()  # tight: the oracle holds dequant(RTN(W / p)) * p, p read from the graph
        costs[method] = np.mean([s.cosine for s in res.quantization])
    linears = [e for e in run.report.features["int4"]["linears"] if e["int4"]]
    assert len(linears) == 14 and all(e["awq_output_error"] <= e["rtn_output_error"] for e in linears)
    assert sum(e["awq_alpha"] > 0 for e in linears) >= 7
    model = onnx.load(str(tmp_path / "awq" / "model.onnx"))
    muls = [n for n in model.graph.node if n.name.endswith("/pre_quant_scale_mul")]
    assert len(muls) == 14
    # the held-out prompts are verify's random tokens, not the calibration text (measured 0.64 -> 0.71)
    assert costs["awq"] > costs["rtn"] + 0.03, costs


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_segmented_calibration_chooses_the_same_scales(salient, tmp_path, monkeypatch):
    """Calibration in one onnxruntime session or in one segment per wanted tensor: the same activations,
    so the same chosen scales and the same folder, byte for byte."""
    from onnx_rewriter.features import calibration

    _, base = salient
    folders, alphas = {}, {}
    for name, nbytes in (("one", 1 << 40), ("many", 1)):
        monkeypatch.setattr(calibration, "SEGMENT_BYTES", nbytes)
        run = pipeline.rewrite(base, tmp_path / name, target="edgellm-0.11", quantize="int4", int4_method="awq",
                               external_data=True)
        folders[name] = {p.name: p.read_bytes() for p in (tmp_path / name).iterdir() if p.is_file()}
        alphas[name] = [e["awq_alpha"] for e in run.report.features["int4"]["linears"] if e["int4"]]
    assert alphas["one"] == alphas["many"] and sum(a > 0 for a in alphas["one"]) >= 7
    assert folders["one"].keys() == folders["many"].keys()
    for f, data in folders["one"].items():
        assert folders["many"][f] == data, f


def test_awq_needs_int4(models, tmp_path):
    with pytest.raises(RewriteError, match="--int4-method awq needs --quantize int4"):
        pipeline.rewrite(models.baseline("qwen2"), tmp_path / "out", int4_method="awq")


def test_lora_reads_the_unscaled_input(salient, tmp_path):
    """LoRA's A multiplies the layer's own x, not the AWQ-scaled x the INT4 plugin reads."""
    ck, base = salient
    pipeline.rewrite(base, tmp_path / "out", target="edgellm-0.11", quantize="int4", int4_method="awq", lora=True)
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    made_by = {o: n for n in model.graph.node for o in n.output}
    muls = {n.name: n for n in model.graph.node if n.name.endswith("/pre_quant_scale_mul")}
    lora_a = [n for n in model.graph.node if n.name.endswith("/lora_matmul_A")]
    assert len(muls) == 14 and len(lora_a) == 14
    for n in lora_a:
        stem = n.name.rsplit("/", 2)[0]
        mul = next(m for name, m in muls.items() if name.startswith(stem + "/"))
        assert n.input[0] == mul.input[0], (n.name, made_by.get(n.input[0]).name)
