"""Output a real runtime loads and reproduces: required config.json keys, exact constants, exact RoPE."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from onnx_rewriter import targets
from onnx_rewriter.analysis import constants as exact
from onnx_rewriter.pipeline.steps import rewrite
from onnx_rewriter.verification.llm import verify

# What the runtimes' config parser requires (contract section 5, docs/contract.md); written literally here so
# a key dropped from config_json.REQUIRED_KEYS fails too.
REQUIRED = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_scaling",
            "partial_rotary_factor", "rms_norm_eps", "model_type", "edgellm_version", "kv_cache_dtype"}
TARGETS = sorted(targets.TARGETS)


def _hf_inv_freq(theta: float, dim: int) -> np.ndarray:
    """inv_freq exactly as transformers computes it (torch, fp32)."""
    return (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))).numpy()


# 999100 and 12345.6: not round, and a tolerance too loose would snap them to 1e6 / 12350.
@pytest.mark.parametrize("theta", [1e4, 5e5, 1e6, 5e6, 999100.0, 12345.6])
@pytest.mark.parametrize("dim", [16, 64, 128])
def test_theta_snaps_to_the_checkpoint_value(theta, dim):
    inv = _hf_inv_freq(theta, dim)
    assert exact.snap_theta(inv, dim)[0] == theta
    assert exact.snap_theta(inv, dim, [theta])[0] == theta  # the config's value, checked against the graph
    # A config theta the graph does not reproduce is not taken; the graph's own (snapped) value is.
    assert exact.snap_theta(inv, dim, [theta * 1.01])[0] == theta


def test_theta_snap_reads_only_unscaled_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    theta, note = exact.snap_theta(inv.numpy(), 64)
    assert theta == 500000.0 and "499998.998" in note


@pytest.mark.parametrize("float_type,d", [(onnx.TensorProto.BFLOAT16, 64), (onnx.TensorProto.FLOAT16, 128),
                                          (onnx.TensorProto.FLOAT, 16)])
def test_split_sqrt_scale_snaps_to_one_over_sqrt_d(float_type, d):
    np_type = {onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.FLOAT: np.float32}.get(float_type)
    root = d ** -0.25
    if np_type is None:  # bf16: keep the top 8 mantissa bits (round to nearest)
        bits = np.array([root], np.float32).view(np.uint32)
        rounded = float(((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).view(np.float32)[0])
    else:
        rounded = float(np_type(root))
    scale = rounded * rounded  # sdpa's export: sqrt(scale) on q and on k
    snapped, note = exact.snap_scale(scale, d, float_type)
    assert snapped == d ** -0.5
    if scale != d ** -0.5:
        assert "1/sqrt" in note


def test_scale_from_config_and_other_integers():
    assert exact.snap_scale(0.015625 * (1 + 1e-3), 64, onnx.TensorProto.BFLOAT16, [0.015625])[0] == 0.015625
    assert exact.snap_scale(0.0625 * (1 + 2e-4), 32, onnx.TensorProto.FLOAT16)[0] == 0.0625  # 1/sqrt(256)
    assert exact.snap_scale(0.1234, 16, onnx.TensorProto.FLOAT)[0] == 0.1234  # nothing simple: kept


def _copy_without_config(baseline, dst):
    """The baseline alone (no config.json beside it): constants must come from the graph."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in baseline.parent.iterdir():
        if f.name.startswith("model.onnx"):
            shutil.copy(f, dst / f.name)
    return dst / "model.onnx"


# One theta per dtype by default (999100: not round, the graph-only run must not write 1e6 for it); the full
# dtype x theta matrix with --runslow.
DEFAULT_CASES = [("float32", 999100.0), ("float16", 5e5), ("bfloat16", 5e6)]
CASES = DEFAULT_CASES + [pytest.param(d, t, marks=pytest.mark.slow) for d in ("float32", "float16", "bfloat16")
                         for t in (1e4, 5e5, 1e6, 5e6, 999100.0) if (d, t) not in DEFAULT_CASES]


@pytest.mark.parametrize("dtype,theta", CASES)
def test_constants_exact_from_rounded_graphs(models, tmp_path, dtype, theta):
    """fp32 / fp16 / bf16 graphs with and without the checkpoint's config: theta and the 0.11 scale are
    written exactly, and the report says what was snapped from what."""
    base = models.baseline("qwen3", dtype, native_dtype=True, rope_theta=theta, head_dim=64)
    for name, src in (("with_config", base), ("graph_only", _copy_without_config(base, tmp_path / "bare"))):
        run = rewrite(src, tmp_path / name, target="edgellm-0.11")
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["rope_theta"] == theta, name
        assert cfg["kv_cache_dtype"] == "fp16"
        scales = {a.f for n in onnx.load(str(tmp_path / name / "model.onnx")).graph.node
                  if n.op_type == "AttentionPlugin" for a in n.attribute if a.name == "attention_scale"}
        assert scales == {np.float32(0.125)}, name  # 1/sqrt(64), from sqrt(0.125) rounded in the dtype
        if name == "graph_only" and dtype == "bfloat16":
            assert "attention scale 0.124973297 (graph constants) -> 0.125 (1/sqrt(64))" in run.report.snapped


@pytest.mark.parametrize("target", TARGETS)
def test_config_json_has_every_required_key(models, tmp_path, target):
    rewrite(models.baseline("llama"), tmp_path / "out", target=target)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert REQUIRED <= set(cfg), sorted(REQUIRED - set(cfg))
    assert cfg["kv_cache_dtype"] == "fp16" and "builder_config" not in cfg


@pytest.mark.parametrize("target", TARGETS)
def test_llama3_rope_is_baked_and_verified_over_the_full_range(models, tmp_path, target, capsys):
    out = tmp_path / "out"
    run = rewrite(models.baseline("llama3"), out, target=target)
    model = onnx.load(str(out / "model.onnx"))
    baked = [t for t in model.graph.initializer if t.name.startswith("rope_rotary_cos_sin_layer")]
    assert [(t.name, list(t.dims)) for t in baked] == [("rope_rotary_cos_sin_layer0", [1, 256, 16])]
    assert "rope_rotary_cos_sin" in {i.name for i in model.graph.input}  # the runtime still binds it
    assert any("RoPE table baked" in s and "256 positions" in s for s in run.report.snapped)
    result = verify(out, model=str(models.checkpoint("llama3")))
    printed = capsys.readouterr().out
    assert result.passed and [c.ok for c in result.rope_checks] == [True]
    assert "layers 0-1 read rope_rotary_cos_sin_layer0; vs the model over positions 0-255" in printed
    assert "verify PASSED" in printed and "NOT" not in printed


def test_verify_fails_when_the_runtime_table_differs(models, tmp_path, capsys, monkeypatch):
    """The old output (llama3 scaling left to the runtime) must fail verify, whatever the logits say."""
    for mod in ("edgellm_09", "edgellm_011"):
        monkeypatch.setattr(f"onnx_rewriter.targets.{mod}.rope_input", lambda layer, b, shared, baked: shared)
    out = tmp_path / "out"
    rewrite(models.baseline("llama3"), out)
    result = verify(out, model=str(models.checkpoint("llama3")))
    printed = capsys.readouterr().out
    assert not result.passed
    assert "read runtime (config.json)" in printed and "will NOT reproduce" in printed
    assert "verify FAILED" in printed and "verify PASSED" not in printed


def test_verify_fails_when_a_baked_table_is_shorter_than_the_range(models, tmp_path, capsys):
    out = tmp_path / "out"
    rewrite(models.baseline("llama3"), out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = 512  # the runtime would go on past the 256 baked rows
    (out / "config.json").write_text(json.dumps(cfg))
    result = verify(out, model=str(models.checkpoint("llama3")))
    assert not result.passed and result.rope_checks[0].first_bad == 256
    assert "verify FAILED" in capsys.readouterr().out


def _rope_layer(theta: float, rotary_dim: int, scaling: float = 1.0):
    from types import SimpleNamespace

    inv = (1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)).astype(np.float32)
    return SimpleNamespace(rope=SimpleNamespace(inv_freq=inv, attention_scaling=scaling))


def test_rope_tables_built_and_compared_in_blocks_are_the_whole_tables(monkeypatch):
    """Tables are compared and baked ROPE_BLOCK positions at a time (a 131072-position table made ~250 MB
    of temporaries at once): the same values as the whole table, and a difference in the last block counts."""
    from onnx_rewriter.analysis.rope import runtime_rope_table
    from onnx_rewriter.targets.base import ROPE_BLOCK, Build, baked_rope_table, layer_rope_table, runtime_builds_it

    positions = 2 * ROPE_BLOCK + 5
    layer = _rope_layer(1e4, 16)
    whole = layer_rope_table(layer, positions)
    np.testing.assert_array_equal(baked_rope_table(layer, positions)[0], whole)
    cfg = {"head_dim": 16, "rope_theta": 1e4, "rope_scaling": None}
    rows = [runtime_rope_table(cfg, min(positions, s + ROPE_BLOCK), s) for s in range(0, positions, ROPE_BLOCK)]
    np.testing.assert_array_equal(np.concatenate(rows), runtime_rope_table(cfg, positions))
    build = Build(graph=None, layers=[], inputs_embeds=None, logits=None, float_type=onnx.TensorProto.FLOAT16,
                  opset=17, rope_positions=positions, runtime_config=cfg)
    assert runtime_builds_it(layer, build)
    # A table off only in the last block's rows is not the runtime's.
    import onnx_rewriter.targets.base as base

    exact_table = base.layer_rope_table

    def off_late(layer, stop, start=0):
        table = exact_table(layer, stop, start)
        table[max(0, 2 * ROPE_BLOCK - start):] += np.float32(0.01)
        return table

    monkeypatch.setattr(base, "layer_rope_table", off_late)
    assert not runtime_builds_it(layer, build)
    monkeypatch.setattr(base, "layer_rope_table", exact_table)
    assert not runtime_builds_it(layer, Build(graph=None, layers=[], inputs_embeds=None, logits=None,
                                              float_type=onnx.TensorProto.FLOAT16, opset=17,
                                              rope_positions=positions, runtime_config=None))
