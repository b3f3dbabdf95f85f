"""VLM text decoders (Qwen2.5-VL, Qwen3-VL): M-RoPE rewrite, deepstack inputs, config.json, verify vs transformers.

Default rows: tiny Qwen2.5-VL and Qwen3-VL (deepstack, interleaved sections) on edgellm-0.9 (fp32, exact
criterion), the checks that make verify able to fail (1-D positions, zeroed deepstack features), the edgellm-0.5
refusal and `inspect`; both families on edgellm-0.10. Slow rows: Qwen3-VL on edgellm-0.11 and the whole
`export` route on 0.9, 0.10 and 0.11 in fp16.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from onnx_rewriter.errors import UnsupportedModel  # noqa: E402
from onnx_rewriter.pipeline import steps as pipeline  # noqa: E402
from onnx_rewriter.verification import vlm as vlm_verify  # noqa: E402

SECTIONS = {"qwen2_5_vl": ([16, 8, 8], False, 0), "qwen3_vl": ([12, 10, 10], True, 2)}


def _rewrite(models, tmp_path, family, target, dtype="float32"):
    ckpt = models.vlm_checkpoint(family)
    out = tmp_path / f"{family}-{target}"
    run = pipeline.rewrite(models.vlm_baseline(family), out, target=target, dtype=dtype, tokenizer=ckpt)
    return ckpt, out, run


def _inputs(out):
    m = onnx.load(str(out / "model.onnx"))
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}


def _check_folder(out, run, family, target):
    sections, interleaved, nd = SECTIONS[family]
    cfg = json.loads((out / "config.json").read_text())
    want_scaling = {"type": "default", "rope_type": "default", "mrope_section": sections}
    if interleaved:
        want_scaling["mrope_interleaved"] = True
    assert cfg["rope_scaling"] == want_scaling
    assert cfg["num_deepstack_features"] == nd
    assert cfg["model"] == f"{family}_text"
    assert cfg["image_token_id"] == 322 and cfg["vision_start_token_id"] == 320
    assert cfg["vision_config"]["depth"] == 2
    assert run.report.features["vlm"] == {"mrope_section": sections, "mrope_interleaved": interleaved,
                                          "num_deepstack_features": nd}
    inputs = _inputs(out)
    assert "position_ids" not in inputs
    batch_major = target in ("edgellm-0.9", "edgellm-0.10")
    rope = ["rope_batch", "rope_max_positions", 64] if batch_major else ["num_tokens", 64]
    assert inputs["rope_rotary_cos_sin"] == rope
    deep = ["batch_size", "seq_len", 128] if batch_major else ["num_tokens", 128]
    assert [inputs.get(f"deepstack_embeds_{i}") for i in range(nd)] == [deep] * nd
    names = list(inputs)
    assert names[len(names) - nd:] == [f"deepstack_embeds_{i}" for i in range(nd)]  # after the target's own


def test_qwen2_5_vl_edgellm_09(models, tmp_path):
    ckpt, out, run = _rewrite(models, tmp_path, "qwen2_5_vl", "edgellm-0.9")
    _check_folder(out, run, "qwen2_5_vl", "edgellm-0.9")
    res = vlm_verify.verify_vlm(out, str(ckpt), steps=2, quiet=True)
    assert res.passed, res.table()
    assert [s.step for s in res.steps][:2] == ["prefill/image", "prefill/text"]
    assert max(s.rel for s in res.steps) < 1e-4

    # The same folder fed 1-D positions (what Qwen2.5-VL computes without mm_token_type_ids) must fail
    # at the image row: the check sees M-RoPE.
    real = vlm_verify.runtime_mrope_table
    vlm_verify.runtime_mrope_table = lambda cfg, p: real(cfg, np.arange(p.shape[1])[None].repeat(3, 0))
    try:
        bad = vlm_verify.verify_vlm(out, str(ckpt), steps=0, quiet=True)
    finally:
        vlm_verify.runtime_mrope_table = real
    assert not bad.passed
    assert bad.steps[0].step == "prefill/image" and bad.steps[0].rel > 1e-3
    assert bad.steps[1].rel < 1e-4  # the text row has t = h = w: 1-D positions are right there


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_vlm_on_010(models, tmp_path, family):
    """edgellm-0.10: the LLM's rope and deepstack as 0.9 (batch-major), over the paged pool (contract 3 §17.5)."""
    ckpt, out, run = _rewrite(models, tmp_path, family, "edgellm-0.10")
    _check_folder(out, run, family, "edgellm-0.10")
    assert "kv_page_table" in _inputs(out)
    res = vlm_verify.verify_vlm(out, str(ckpt), steps=2, quiet=True)
    assert res.passed, res.table()


def test_edgellm_05_refused(models, tmp_path):
    with pytest.raises(UnsupportedModel, match=r"cannot be written for edgellm-0\.5: runtimes 0\.4/0\.5 hard-code"):
        _rewrite(models, tmp_path, "qwen2_5_vl", "edgellm-0.5")
    assert not (tmp_path / "qwen2_5_vl-edgellm-0.5").exists()


def test_inspect_shows_sections(models):
    from onnx_rewriter.pipeline.inspection import inspect

    text = inspect(models.vlm_baseline("qwen2_5_vl"))
    assert "  M-RoPE sections (t,h,w) [16, 8, 8] sectioned" in text.splitlines()
    assert text.splitlines()[-1] == "verdict: would rewrite all 2 layers for edgellm-0.9"


# edgellm-0.9 in the default suite: the only default check of the interleaved sections and where deepstack is added.
@pytest.mark.parametrize("target", ["edgellm-0.9", pytest.param("edgellm-0.11", marks=pytest.mark.slow)])
def test_qwen3_vl_deepstack(models, tmp_path, target):
    ckpt, out, run = _rewrite(models, tmp_path, "qwen3_vl", target)
    _check_folder(out, run, "qwen3_vl", target)
    res = vlm_verify.verify_vlm(out, str(ckpt), steps=2, quiet=True)
    assert res.passed, res.table()
    # Without the deepstack features the image row must fail: the inputs are read.
    real = vlm_verify.VlmSession.step_inputs
    vlm_verify.VlmSession.step_inputs = lambda self, ids: {k: v * 0 for k, v in real(self, ids).items()}
    try:
        bad = vlm_verify.verify_vlm(out, str(ckpt), steps=0, quiet=True)
    finally:
        vlm_verify.VlmSession.step_inputs = real
    assert not bad.passed and bad.steps[0].rel > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("target", ["edgellm-0.9", "edgellm-0.10", "edgellm-0.11"])
def test_export_route_fp16(models, tmp_path, family, target):
    import onnx_rewriter

    ckpt = models.vlm_checkpoint(family)
    run = onnx_rewriter.export(model=str(ckpt), output_dir=tmp_path / "out", target=target)
    assert run.out_dir == tmp_path / "out" / "llm"
    _check_folder(run.out_dir, run, family, target)
    res = onnx_rewriter.verify(tmp_path / "out", model=str(ckpt), steps=4, quiet=True)
    assert res.passed, res.table()


def test_export_fails_without_the_vision_package(tmp_path, monkeypatch):
    """An install without onnx_rewriter.vision (a wheel that left it out) fails in one line before the model
    is loaded, instead of writing a VLM folder without its visual/ encoder."""
    import sys

    import onnx_rewriter
    from onnx_rewriter.errors import RewriteError

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    monkeypatch.setitem(sys.modules, "onnx_rewriter.vision", None)  # what a missing package looks like
    with pytest.raises(RewriteError, match=r"needs onnx_rewriter\.vision, which does not import .*reinstall") as err:
        onnx_rewriter.export(str(ckpt), tmp_path / "out", target="edgellm-0.9")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
