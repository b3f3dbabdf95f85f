"""W+A quantized checkpoints (features/wa_checkpoint.py, hf/tiny_quant.py): every form of contract part 3 section 16.7
is recognised from its signal, its tensors decode to the weights it was written from, and the export route
refuses every form it does not read in one line naming it (before anything is loaded, no output left), while
block-FP8 exports as fp16 weights and verifies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnx_rewriter import cli
from onnx_rewriter.errors import RewriteError
from onnx_rewriter.features import wa_checkpoint as W
from onnx_rewriter.hf import tiny_quant
from onnx_rewriter.hf.trace import check_quantization
from onnx_rewriter.reference import wa_codecs as C

EXPECT = {  # form -> (scheme, words the one-line name holds)
    "fp8": ("fp8", "ModelOpt FP8"), "nvfp4": ("nvfp4", "ModelOpt NVFP4"),
    "w4a16_nvfp4": ("w4a16_nvfp4", "W4A16_NVFP4"), "int8_sq": ("int8_sq", "W8A8_SQ_PER_CHANNEL"),
    "mxfp8": ("mxfp8", "MXFP8"), "mixed": ("mixed", "MIXED_PRECISION"),
    "block_fp8": ("block_fp8", "block-FP8"), "compressed_tensors": ("compressed_tensors", "compressed-tensors"),
}
# Relative weight error each form may add (measured: FP8 0.027, NVFP4 0.096, INT8 0.004-0.04, block-FP8 0.027)
TOLERANCE = {"fp8": 0.04, "nvfp4": 0.12, "w4a16_nvfp4": 0.12, "int8_sq": 0.06, "mxfp8": 0.04, "block_fp8": 0.04,
             "mixed": 0.12}


@pytest.fixture(scope="module")
def plain(models):
    return models.checkpoint("llama")


@pytest.fixture(scope="module")
def written(plain, tmp_path_factory):
    root = tmp_path_factory.mktemp("wa_ck")
    return {form: tiny_quant.write(form, plain, root / form, kv_scales=(0.05, 0.06)) for form in tiny_quant.FORMS}


@pytest.mark.parametrize("form", tiny_quant.FORMS)
def test_each_form_is_recognised_and_decodes_to_its_weights(written, plain, form):
    fmt = W.detect(written[form])
    scheme, words = EXPECT[form]
    assert fmt.scheme == scheme and words in fmt.name
    if form == "compressed_tensors":
        assert fmt.exclude == ("lm_head",)
        return
    src = tiny_quant.read_tensors(plain)
    ck = W.Checkpoint(written[form], fmt)
    assert len(ck.linears) == 14 and "lm_head" not in ck.linears  # excluded, stays fp
    if form == "mixed":
        assert {s for m, s in ck.linears.items() if ".layers.0." in m} == {"fp8"}
        assert {s for m, s in ck.linears.items() if ".layers.1." in m} == {"nvfp4"}
    for module in ck.linears:
        lin = ck.linear(module)
        w = src[f"{module}.weight"]
        assert lin.shape == w.shape
        err = np.linalg.norm(lin.effective() - w) / np.linalg.norm(w)
        assert err < TOLERANCE[form], (module, err)
    assert "model.embed_tokens.weight" in ck.plain() and not any(k.endswith("_scale") for k in ck.plain())
    if form in ("fp8", "nvfp4"):
        assert ck.kv_scales()[(1, "k")] == pytest.approx(0.05) and ck.kv_scales()[(0, "v")] == pytest.approx(0.06)


@pytest.mark.parametrize("signal", ["hf_quant_config", "config", "both"])
def test_modelopt_signal_in_either_file(plain, tmp_path, signal):
    ck = tiny_quant.write("nvfp4", plain, tmp_path / "ck", signal=signal)
    fmt = W.detect(ck)
    assert fmt.scheme == "nvfp4"
    assert ("hf_quant_config.json" in fmt.name) == (signal != "config")  # NVIDIA's order: that file first
    assert (ck / "hf_quant_config.json").is_file() == (signal != "config")


def test_quantized_tensors_without_a_config_are_recognised(plain, tmp_path):
    fmt = W.detect(tiny_quant.write("fp8", plain, tmp_path / "ck", signal="none"))
    assert fmt.scheme == "unknown" and "without a quantization config" in fmt.name
    assert W.detect(plain) is None


@pytest.mark.parametrize("algo, scheme", [
    ("FP8", "fp8"), ("NVFP4", "nvfp4"), ("W4A16_NVFP4", "w4a16_nvfp4"), ("W8A8_SQ_PER_CHANNEL", "int8_sq"),
    ("INT8_SQ", "int8_sq"), ("MXFP8", "mxfp8"), ("FP8_PB_WO", "mxfp8"), ("W4A16_AWQ", "int4"),
    ("MIXED_PRECISION", "mixed"), ("W4A8_AWQ", "unknown"), ("INT4_XYZ", "unknown")])
def test_quant_algo_names(algo, scheme):
    assert W.scheme_of(algo) == scheme


def test_block_fp8_reads_the_scale_of_each_128_block():
    """A 200 x 300 weight: 2 x 3 blocks, the last ones partial; each block's scale is its own."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((200, 300)).astype(np.float32)
    w *= np.exp2(np.arange(6).reshape(2, 3) * 2.0).repeat(128, 0)[:200].repeat(128, 1)[:, :300]
    t = tiny_quant.quantize_linear("block_fp8", w, 1.0, rng)
    assert t["weight_scale_inv"].shape == (2, 3)
    lin = W.QuantLinear("m", "block_fp8", {"weight": t["weight"][1], "weight_scale_inv": t["weight_scale_inv"]})
    deq = lin.dequantized(np.float64)
    per = t["weight_scale_inv"].astype(np.float64).repeat(128, 0)[:200].repeat(128, 1)[:, :300]
    np.testing.assert_array_equal(deq, C.e4m3_decode(t["weight"][1]).astype(np.float64) * per)
    assert np.all(np.abs(deq - w) <= per * 16 + 1e-30)  # within half an E4M3 step (2**-4 relative) of its block
    assert np.linalg.norm(deq - w) < 0.04 * np.linalg.norm(w)
    # fp16 rounding happens once, from the exact product
    np.testing.assert_array_equal(lin.dequantized(np.float16), deq.astype(np.float16))


def test_nvfp4_checkpoint_bytes_are_the_codecs(written, plain):
    ck = W.Checkpoint(written["nvfp4"], W.detect(written["nvfp4"]))
    lin = ck.linear("model.layers.0.self_attn.q_proj")
    w = tiny_quant.read_tensors(plain)["model.layers.0.self_attn.q_proj.weight"]
    packed, sblk, s_g = C.nvfp4_quantize_weight(w)
    assert np.array_equal(lin.tensors["weight"], packed) and np.array_equal(lin.tensors["weight_scale"], sblk)
    assert lin.tensors["weight_scale_2"] == s_g
    assert lin.tensors["input_scale"] == np.float32(4.0 / (6 * 448))


def test_wrong_tensor_dtype_or_shape_is_named(written, tmp_path):
    ck = W.Checkpoint(written["fp8"], W.detect(written["fp8"]))
    ck._entries["model.layers.0.self_attn.q_proj.weight_scale"] = ck._entries["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(RewriteError, match=r"q_proj.weight_scale is F8_E4M3, expected F32"):
        ck.linear("model.layers.0.self_attn.q_proj")


EXPORTED = ("block_fp8", "fp8", "int8_sq", "nvfp4", "w4a16_nvfp4", "mxfp8", "mixed")  # test_wa_quant/formats.py
REFUSED = [f for f in tiny_quant.FORMS if f not in EXPORTED]


@pytest.mark.parametrize("form", REFUSED)
def test_export_route_refuses_by_name(written, form):
    with pytest.raises(RewriteError) as exc:
        check_quantization(written[form])
    msg = str(exc.value)
    assert "\n" not in msg and EXPECT[form][1] in msg and "not supported" in msg
    assert [check_quantization(written[f]).scheme for f in EXPORTED] == list(EXPORTED)


def test_modelopt_int4_declared_only_in_hf_quant_config_is_refused(plain, tmp_path):
    ck = tiny_quant.write("fp8", plain, tmp_path / "ck", signal="hf_quant_config")
    (ck / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "W4A16_AWQ"}}))
    with pytest.raises(RewriteError, match="no quantization_config in config.json"):
        check_quantization(ck)


def test_cli_export_refuses_an_mxfp8_checkpoint_on_05_before_loading(written, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["export", "--model", str(written["mxfp8"]), "--output-dir", str(out), "--target", "edgellm-0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: MXFP8 checkpoint: target edgellm-0.5 has no weight+activation quantization")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_block_fp8_exports_fp16_weights_and_verifies(written, plain, tmp_path):
    import onnx
    from onnx import numpy_helper

    from onnx_rewriter import export
    from onnx_rewriter.verification.llm import verify

    ck = written["block_fp8"]
    export(str(ck), tmp_path / "out", target="edgellm-0.11")
    res = verify(tmp_path / "out", model=str(ck), quiet=True)
    assert res.passed, res.table()
    # the graph's weights are the checkpoint's fp8 * scale_inv rounded once to fp16, not the fp weights
    fmt = W.detect(ck)
    lin = W.Checkpoint(ck, fmt).linear("model.layers.1.mlp.down_proj")
    want = lin.dequantized(np.float16)
    g = onnx.load(str(tmp_path / "out" / "model.onnx"))
    found = [numpy_helper.to_array(t) for t in g.graph.initializer if tuple(t.dims) in (want.shape, want.T.shape)]
    assert any(np.array_equal(a.T if a.shape != want.shape else a, want) for a in found)
    original = tiny_quant.read_tensors(plain)["model.layers.1.mlp.down_proj.weight"].astype(np.float16)
    assert not any(np.array_equal(a.T if a.shape != want.shape else a, original) for a in found)


def test_kv_cache_only_modelopt_checkpoint_stays_the_fp16_route(plain, tmp_path):
    """quant_algo null + kv_cache_quant_algo FP8 (ModelOpt's FP8-KV-only export): fp16 weights, --kv-cache fp8
    reads its k_scale / v_scale; not a W+A checkpoint."""
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(plain, ck)
    (ck / "hf_quant_config.json").write_text(json.dumps(
        {"quantization": {"quant_algo": None, "kv_cache_quant_algo": "FP8"}}))
    assert W.detect(ck) is None and check_quantization(ck) is None


def test_checkpoint_check_reads_nvfp4_shapes(written):
    """NVFP4's [N, K/2] weight is not ModelOpt INT4's [N/2, K]: the size check passes it (a future NVFP4 route
    must not be stopped by a wrong 'intermediate_size' message), and still catches a wrong config."""
    from onnx_rewriter.hf import checkpoint_check
    from onnx_rewriter.modelio.config_file import read_config

    ck = written["nvfp4"]
    config = read_config(ck / "config.json")
    checkpoint_check.check(sorted(ck.glob("*.safetensors")), config)
    with pytest.raises(RewriteError, match="intermediate_size=64"):
        checkpoint_check.check(sorted(ck.glob("*.safetensors")), {**config, "intermediate_size": 64})


def test_calibrated_input_scales(plain, tmp_path):
    """--calibrate: each linear's input amax over the bundled prompts becomes its input_scale (amax / 448)."""
    amax = tiny_quant.calibrated_amax(plain)
    assert len(amax) == 14 and all(v > 0 for v in amax.values())
    ck = tiny_quant.write("fp8", plain, tmp_path / "ck", input_amax=amax)
    lin = W.Checkpoint(ck, W.detect(ck)).linear("model.layers.1.mlp.down_proj")
    assert lin.tensors["input_scale"] == np.float32(amax["model.layers.1.mlp.down_proj"] / 448)
