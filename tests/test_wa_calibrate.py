"""--quantize fp8 | nvfp4 | int8-sq from an fp16 model (features/wa_calibrate.py): calibrated scales, the tensors a
ModelOpt checkpoint would hold emitted by wa_quant's Q/DQ code, verify against the twin rebuilt from the model and
against the model's own weights; SmoothQuant's searched migration; refusals by name."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_rewriter import export
from onnx_rewriter.errors import RewriteError, UnsupportedModel
from onnx_rewriter.features import wa_calibrate as WC
from onnx_rewriter.hf import tiny_quant
from onnx_rewriter.pipeline import steps as pipeline
from onnx_rewriter.verification.llm import verify

# one scheme per target in the default suite (0.9: QuantizeLinear below opset 21); the rest behind --runslow
FAST = [("fp8", "edgellm-0.9"), ("int8-sq", "edgellm-0.10"), ("nvfp4", "edgellm-0.11")]
SLOW = [("fp8", "edgellm-0.10"), ("fp8", "edgellm-0.11"), ("int8-sq", "edgellm-0.9"), ("int8-sq", "edgellm-0.11"),
        ("nvfp4", "edgellm-0.10"), ("nvfp4", "edgellm-0.9")]


@pytest.fixture(scope="module")
def rewritten(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("wa_calib")
    base = models.baseline("llama")
    return {(q, t): (root / f"{q}-{t}", pipeline.rewrite(base, root / f"{q}-{t}", target=t, quantize=q))
            for q, t in FAST}


@pytest.mark.parametrize("quantize,target", FAST)
def test_calibrated_folder_verifies(rewritten, models, quantize, target):
    out, run = rewritten[(quantize, target)]
    res = verify(out, model=str(models.checkpoint("llama")), steps=1, quiet=True)
    assert res.passed and not res.problems, res.table() + "\n" + "\n".join(res.problems)
    report = run.report.features["wa_quant"]
    done = [e for e in report["linears"] if e["wa"]]
    assert len(done) == 14 and report["calibration"]["tokens"] > 100  # q/k/v/o/gate/up/down x 2; lm_head fp16
    assert [e["reason"] for e in report["linears"] if not e["wa"]] == [
        "lm_head stays fp16 (--quantize-lm-head quantizes it)"]


def test_int8_sq_smoothing_is_searched_and_applied(rewritten):
    """The search picks a migration per input (never worse than none on the calibration rows) and the graph
    multiplies the input by a non-trivial pre_quant_scale: the weight was divided by it (mutant: the weight
    smoothed, the activation not)."""
    out, run = rewritten[("int8-sq", "edgellm-0.10")]
    sq = run.report.features["wa_quant"]["calibration"]["smoothquant"]
    assert len(sq) == 8 and all(v["error"] <= v["off_error"] for v in sq.values())
    assert sum(v["alpha"] is not None for v in sq.values()) >= 4, sq
    g = onnx.load(str(out / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in g.graph.initializer}
    pqs = [inits[n.input[1]] for n in g.graph.node if n.name.endswith("/smooth/Mul")]
    assert pqs and any(not np.all(p == 1) for p in pqs)


def test_fidelity_catches_a_weight_smoothed_without_its_activation():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 64)) * 0.05).astype(np.float16)
    x = rng.standard_normal((100, 64)).astype(np.float32)
    x[:, [3, 40]] *= 40  # outlier channels: smoothing helps
    amax = np.abs(x).max(0)
    pqs, info = WC.smoothquant(x, amax, [w], "search")
    assert pqs is not None and info["error"] < info["off_error"]
    good = WC.twin_weight("int8_sq", w, pqs)
    scales = np.abs(w.astype(np.float64) / pqs.astype(np.float64)).max(1) / 127
    assert WC.fidelity("int8_sq", good, scales, w, pqs) == 0
    assert WC.fidelity("int8_sq", good, scales, w, None) > 0  # the Mul dropped: the weight is not the model's
    for scheme in ("fp8", "nvfp4"):
        q = WC.twin_weight(scheme, w)
        amax_w = float(np.abs(w.astype(np.float32)).max())
        small = WC.weight_small(scheme, amax_w)
        if scheme == "fp8":
            s = np.float16(small["weight_scale"])
        else:
            s = WC.C.e4m3_decode(WC.quantize_block(scheme, w, small)["weight_scale"]) * small["weight_scale_2"]
        assert WC.fidelity(scheme, q, s, w) == 0
        assert WC.fidelity(scheme, q, s, w * np.float16(1.1)) > 0


def test_refusals_by_name(models, tmp_path):
    base = models.baseline("llama")
    with pytest.raises(UnsupportedModel, match="--quantize fp8: target edgellm-0.5 has no weight"):
        pipeline.make_options(target="edgellm-0.5", quantize="fp8")
    with pytest.raises(RewriteError, match="--smoothquant-alpha 0.5 needs --quantize int8-sq"):
        pipeline.make_options(quantize="fp8", smoothquant_alpha="0.5")
    with pytest.raises(RewriteError, match="--quantize-lm-head needs"):
        pipeline.make_options(quantize_lm_head=True)
    with pytest.raises(RewriteError, match="give search, off or a number"):
        pipeline.make_options(quantize="int8-sq", smoothquant_alpha="2")
    ck = tiny_quant.write("fp8", models.checkpoint("llama"), tmp_path / "fp8ck", signal="config")
    with pytest.raises(UnsupportedModel, match="--quantize int8-sq: .* is already a ModelOpt FP8"):
        export(str(ck), tmp_path / "out", target="edgellm-0.11", quantize="int8-sq")
    assert not (tmp_path / "out").exists() and base.is_file()


@pytest.mark.slow
@pytest.mark.parametrize("quantize,target", FAST + SLOW)
def test_export_verifies_on_every_allowed_target(models, tmp_path, quantize, target):
    """`export --quantize` on the tiny Qwen2 (q/k/v biases) with a calibration file, lm_head quantized too."""
    prompts = tmp_path / "calib.txt"
    prompts.write_text("The cat sat on the mat.\nOne, two, three, four, five, six, seven.\ndef f(x): return x\n")
    ck = models.checkpoint("qwen2")
    run = export(str(ck), tmp_path / "out", target=target, quantize=quantize, calibration=str(prompts),
                 quantize_lm_head=True)
    assert all(e["wa"] for e in run.report.features["wa_quant"]["linears"])
    res = verify(tmp_path / "out", model=str(ck), steps=2, quiet=True)
    assert res.passed and not res.problems, res.table() + "\n" + "\n".join(res.problems)


def test_fp8_weight_codes_are_the_reference_codecs():
    """quantize_block's fast cast (ml_dtypes, on the fp32 quotient) gives wa_codecs.e4m3_encode's codes: ties to
    even, subnormals, saturation past 448."""
    rng = np.random.default_rng(1)
    vals = WC.C.E4M3_VALUES[np.isfinite(WC.C.E4M3_VALUES)].astype(np.float64)
    ties = (vals[1:126] + vals[2:127]) / 2
    x = np.concatenate([rng.standard_normal(200_000) * 100, vals, ties, -ties, [500.0, -6e4, 0.0, 2.0 ** -10]])
    x = x.astype(np.float16)[None, :]
    small = {"weight_scale": np.array(1.0, np.float32)}
    got = WC.quantize_block("fp8", x, small)["weight"]
    assert np.array_equal(got, WC.C.e4m3_encode(x.astype(np.float32)))


def test_input_scales_are_the_calibrated_amax(rewritten, models):
    """Each linear's input scale is its input's amax over the bundled prompts / 448 (FP8), / (6 * 448) (NVFP4), as
    transformers measures it (hf/tiny_quant.calibrated_amax): verify alone cannot see a badly calibrated scale (the
    twin takes the graph's)."""
    amax = tiny_quant.calibrated_amax(models.checkpoint("llama"))
    for quantize, div in (("fp8", 448.0), ("nvfp4", 6 * 448.0)):
        out, run = rewritten[next(k for k in FAST if k[0] == quantize)]
        for e in run.report.features["wa_quant"]["linears"]:
            if e["wa"]:
                assert e["input_scale"] == pytest.approx(amax[e["linear"]] / div, rel=2e-3), e["linear"]


@pytest.mark.parametrize("scheme,alpha,keys", [("fp8", "off", ["weight"]), ("int8_sq", 0.5, ["weight"]),
                                              ("nvfp4", "off", ["weight", "weight_scale"]),
                                              ("nvfp4", "off", ["weight_scale", "weight"])])
@pytest.mark.parametrize("dtype", [onnx.TensorProto.FLOAT, onnx.TensorProto.BFLOAT16])
def test_codes_streamed_in_row_blocks_equal_the_whole_linear(tmp_path, monkeypatch, scheme, alpha, keys, dtype):
    """A weight the graph reads from a file: codes (and NVFP4's block scales, in either order the writer reads
    them) are made in blocks of output rows (strips gathered in passes over the weight's rows) and must equal
    those of the whole linear quantized at once."""
    from onnx_rewriter.modelio.graph import lazy_constant

    rng = np.random.default_rng(3)
    k, n = 64, 200
    w = rng.normal(size=(k, n)).astype(np.float32)
    if dtype == onnx.TensorProto.BFLOAT16:
        raw = (w.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    else:
        raw = w.tobytes()
    (tmp_path / "w.bin").write_bytes(raw)
    proto = onnx.TensorProto(name="w", data_type=dtype, dims=(k, n), data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(len(raw)))):
        proto.external_data.add(key=key, value=value)
    x = rng.normal(size=(32, k)).astype(np.float32)

    lin = WC.CalibratedLinears(scheme, tmp_path, alpha)
    lin.add("m", lazy_constant("w", proto), "x")
    lin.stats["x"] = WC.InputStats(np.abs(x).max(axis=0), x)
    monkeypatch.setattr(WC, "STRIP_BYTES", 2 * k * 96)  # strips of 96 output rows: 96, 96, 8
    monkeypatch.setattr(WC, "CODE_BLOCK_BYTES", 4 * k * 40)  # quantized 40 rows at a time: 40, 40, 16, ...
    streamed = {key: np.concatenate(list(lin.linear("m").tensors[key])) for key in keys}
    assert not lin._scales  # nothing kept once both were read
    # the whole linear at once: the graph's fp16 weight [N, K] (a bf16 source widened, then narrowed)
    w_fp16 = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(k, n) \
        if dtype == onnx.TensorProto.BFLOAT16 else w
    pqs = lin._pre_quant_scale("x") if scheme == "int8_sq" else None
    whole = WC.quantize_block(scheme, w_fp16.astype(np.float16).T, lin._small_of("m"), pqs)
    assert streamed["weight"].shape == (n, k // 2 if scheme == "nvfp4" else k)
    for key in keys:
        assert np.array_equal(streamed[key], whole[key]), key


@pytest.mark.parametrize("quantize", ["fp8", "nvfp4", "int8-sq"])
def test_weights_read_from_files_stream_their_codes_and_verify(models, tmp_path, monkeypatch, quantize):
    """The baseline's weights in an external file (as every real export): the codes stream to the writer in row
    blocks (_code_rows; small strips so each linear takes several) and the folder, written with --external-data
    (its pre_quant_scales in the data file too), verifies."""
    base = tmp_path / "base" / "model.onnx"
    base.parent.mkdir()
    onnx.save(onnx.load(str(models.baseline("llama"))), str(base), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    models.copy_side_files(models.checkpoint("llama"), base.parent)
    from onnx_rewriter.modelio import graph as graphio

    monkeypatch.setattr(graphio, "SMALL_TENSOR_ELEMENTS", 1024)  # the tiny weights stay in their file, as big ones
    monkeypatch.setattr(graphio, "EXPLICIT_EXTERNAL_MIN", 16)  # and pre_quant_scale [K] goes to the output's file
    monkeypatch.setattr(WC, "STRIP_BYTES", 1 << 14)
    made = []
    rows = WC.CalibratedLinears._code_rows
    monkeypatch.setattr(WC.CalibratedLinears, "_code_rows", lambda self, m, key="weight": made.append(key) or
                        rows(self, m, key))
    out = tmp_path / "out"
    pipeline.rewrite(base, out, target="edgellm-0.11", quantize=quantize, external_data=True)
    assert made.count("weight") == 14 and made.count("weight_scale") == (14 if quantize == "nvfp4" else 0)
    res = verify(out, model=str(models.checkpoint("llama")), steps=1, quiet=True)
    assert res.passed and not res.problems, res.table() + "\n" + "\n".join(res.problems)
