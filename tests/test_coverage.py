"""Model coverage: every family and exporter flavour is rewritten and verified, or refused with a reason.

One row per (family, flavour). A row exports the tiny checkpoint through the session fixture, rewrites
it for edgellm-0.9 (and, from the same export, for edgellm-0.10: test_rewritten_and_verified_on_010),
checks the node contract (one AttentionPlugin per layer, nothing of the model's own attention, RoPE or
cache left, plugin attributes) and runs verify against transformers. docs/support.md
is the table these rows back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_rewriter.pipeline import steps as pipeline
from onnx_rewriter.verification.llm import prompts, verify

LAYERS = 2  # every tiny family
GONE_OPS = {"Softmax", "Cos", "Sin", "Attention", "RotaryEmbedding"}
GONE_INPUTS = ("input_ids", "attention_mask", "position_ids", "past_key_values.")


@dataclass
class Row:
    id: str
    family: str
    export: dict = field(default_factory=dict)  # Models.baseline flavour: exporter, opset, attn, native_dtype, kv_cache
    config: dict = field(default_factory=dict)  # checkpoint config overrides
    ckpt_dtype: str = "float32"
    dtypes: tuple = ("float32",)  # rewrite + verify in these output dtypes
    windows: tuple = (-1, -1)  # sliding_window_size per layer
    heads: tuple | None = None  # (num_q_heads, num_kv_heads, head_size)
    verify_kw: dict = field(default_factory=dict)
    check: Callable | None = None  # extra row-specific checks: check(out, model, run, ckpt)

    def baseline(self, models):
        return models.baseline(self.family, dtype=self.ckpt_dtype, **self.export, **self.config)

    def checkpoint(self, models):
        return models.checkpoint(self.family, dtype=self.ckpt_dtype, **self.config)


# ---------------------------------------------------------------- row-specific checks


def _consumers(model, name):
    return [n for n in model.graph.node if name in n.input]


def _const(model, name):
    inits = {i.name: i for i in model.graph.initializer}
    if name in inits:
        return numpy_helper.to_array(inits[name])
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def _rope_in(node) -> str:
    """The RoPE table a plugin reads (its position differs per target)."""
    return next(i for i in node.input if i.startswith("rope_rotary_cos_sin"))


def _target(run) -> str:
    return run.options.target.name


def _scalar_muls(model, x, value):
    """Mul nodes reading `x` (or a Cast of it) with a scalar constant close to `value`."""
    reads = [x] + [n.output[0] for n in _consumers(model, x) if n.op_type == "Cast"]
    found = []
    for t in reads:
        for n in _consumers(model, t):
            if n.op_type == "Mul":
                c = [_const(model, i) for i in n.input if i != t]
                if c and c[0] is not None and c[0].size == 1 and abs(float(c[0]) - value) <= 1e-2 * value:
                    found.append(n)
    return found


def check_gemma_embedding_scale(out, model, run, ckpt):
    """Gemma multiplies the lookup by sqrt(H): kept in the graph exactly once, the table not pre-scaled."""
    from safetensors.numpy import load_file

    hidden = run.spec["hidden_size"]
    muls = _scalar_muls(model, "inputs_embeds", math.sqrt(hidden))
    assert len(muls) == 1, f"expected one Mul by sqrt({hidden}) after inputs_embeds, found {len(muls)}"
    table = load_file(str(out / "embedding.safetensors"))["embedding"].astype(np.float32)
    weights = load_file(str(ckpt / "model.safetensors"))
    raw = weights.get("model.embed_tokens.weight", weights.get("lm_head.weight")).astype(np.float32)
    np.testing.assert_allclose(table, raw, rtol=1e-3, atol=1e-4)  # the raw table, not raw * sqrt(H)


def check_gemma3_tables(out, model, run, ckpt):
    """The sliding layer's own RoPE table (theta 1e4) is baked in; the global layer reads the runtime's."""
    plugins = [n for n in model.graph.node if n.op_type == "AttentionPlugin"]
    rope_in = [_rope_in(n) for n in plugins]
    assert rope_in[1] == "rope_rotary_cos_sin"
    baked = _const(model, rope_in[0])
    assert baked is not None and baked.dtype == np.float32 and baked.shape == (1, 256, 16)  # [1, max_pos, R]
    inv = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)  # local theta
    np.testing.assert_allclose(baked[0, 7, :8], np.cos(7 * inv), atol=1e-6)
    np.testing.assert_allclose(baked[0, 7, 8:], np.sin(7 * inv), atol=1e-6)
    assert run.spec["rope_theta"] == pytest.approx(1e6, rel=1e-6)  # config.json carries the global theta
    if _target(run) == "edgellm-0.10":  # the attention_scale attribute (q/k-norm in the plugin: no pre-scale)
        assert all(onnx.helper.get_attribute_value(a) == pytest.approx(24 ** -0.5)
                   for n in plugins for a in n.attribute if a.name == "attention_scale")
        return
    # query_pre_attn_scalar 24 != head_dim 16: the scale 24^-0.5 is pre-applied to q, once per layer.
    factor = (24 ** -0.5) / (16 ** -0.5)
    pre = [n for n in model.graph.node if n.op_type == "Mul"
           and any((c := _const(model, i)) is not None and c.size == 1 and abs(float(c) - factor) < 1e-3
                   for i in n.input)]
    assert len(pre) == LAYERS


def check_yarn_table(out, model, run, ckpt):
    """YaRN: the runtime has no such table; the model's own is baked, cos and sin times attention_scaling."""
    plugins = [n for n in model.graph.node if n.op_type == "AttentionPlugin"]
    assert {_rope_in(n) for n in plugins} == {"rope_rotary_cos_sin_layer0"}
    baked = _const(model, _rope_in(plugins[0]))
    assert baked.shape == (1, 4096, 32)  # [1, max_pos, R]
    np.testing.assert_allclose(baked[0, 0, :16], 0.1 * math.log(4.0) + 1.0, rtol=1e-6)  # cos(0) · scaling
    assert run.spec["rope_theta"] == 99100.0  # read off the unscaled top frequencies


def check_qk_norm_kept(out, model, run, ckpt):
    """Qwen3's q/k RMSNorm stays in the graph for 0.9: 2 per layer besides the 2 layer norms and the final;
    on 0.10 it moves into the plugin (enable_qk_norm=1, gammas after kv_page_table)."""
    n = sum(1 for x in model.graph.node if x.op_type in ("ReduceMean", "RMSNormalization"))
    moved = _target(run) == "edgellm-0.10"
    assert n == (2 if moved else 4) * LAYERS + 1
    if moved:
        assert all(len(p.input) == 8 for p in model.graph.node if p.op_type == "AttentionPlugin")


def check_partial_rotary(out, model, run, ckpt):
    rope = next(i for i in model.graph.input if i.name == "rope_rotary_cos_sin")
    assert rope.type.tensor_type.shape.dim[2].dim_value == 8  # R = 16 * 0.5
    assert run.spec["rotary_dim"] == 8


def check_no_cache_io_left(out, model, run, ckpt):
    names = [i.name for i in model.graph.input] + [o.name for o in model.graph.output]
    assert not [n for n in names if n.startswith(("past_key_values.", "present."))]
    assert all("kv_cache_concat" in layer.patterns for layer in run.report.layers)


def check_casts(out, model, run, ckpt):
    assert any(n.op_type == "Cast" for n in model.graph.node)
    assert not [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.BFLOAT16]


ROWS = [
    Row("llama", "llama", dtypes=("float32", "float16")),
    Row("llama-eager", "llama", export=dict(attn="eager")),
    Row("llama_tied", "llama_tied"),
    Row("smollm", "smollm", heads=(9, 3, 16)),
    Row("qwen2", "qwen2"),  # random q/k/v biases (fused q/k/v GEMM), theta 999100
    Row("yarn", "yarn", heads=(2, 1, 32), check=check_yarn_table),
    pytest.param(Row("qwen2-eager", "qwen2", export=dict(attn="eager")), marks=pytest.mark.slow),
    Row("qwen3", "qwen3", dtypes=("float32", "float16"), check=check_qk_norm_kept),
    Row("mistral_window", "mistral_window", windows=(8, 8), dtypes=("float32", "float16")),
    Row("phi3", "phi3", check=check_partial_rotary),
    Row("gemma", "gemma", heads=(4, 1, 32), check=check_gemma_embedding_scale),
    Row("gemma3", "gemma3", config=dict(query_pre_attn_scalar=24), windows=(8, -1), dtypes=("float32", "float16"),
        check=check_gemma3_tables),
    Row("llama-opset23", "llama", export=dict(opset=23)),
    Row("llama-torchscript", "llama", export=dict(exporter="torchscript")),
    Row("qwen2-torchscript", "qwen2", export=dict(exporter="torchscript")),
    Row("gemma3-torchscript", "gemma3", export=dict(exporter="torchscript"), config=dict(query_pre_attn_scalar=24),
        windows=(8, -1), check=check_gemma3_tables),
    pytest.param(Row("phi3-opset23", "phi3", export=dict(opset=23), check=check_partial_rotary),
                 marks=pytest.mark.slow),
    pytest.param(Row("gemma3-opset23", "gemma3", export=dict(opset=23), config=dict(query_pre_attn_scalar=24),
                     windows=(8, -1), check=check_gemma3_tables), marks=pytest.mark.slow),
    Row("llama-kv-cache", "llama", export=dict(kv_cache=True), check=check_no_cache_io_left),
    Row("llama-kv-cache-torchscript", "llama", export=dict(kv_cache=True, exporter="torchscript"),
        check=check_no_cache_io_left),
    Row("llama-bf16", "llama", ckpt_dtype="bfloat16", export=dict(native_dtype=True), dtypes=("float16",),
        check=check_casts),
    # `make export`'s baselines: weights referenced in the checkpoint, transposes folded while writing.
    Row("llama-bf16-export", "llama", ckpt_dtype="bfloat16", export=dict(native_dtype=True, refs=True),
        dtypes=("float16",), check=check_casts),
    Row("qwen2-export", "qwen2", export=dict(refs=True), dtypes=("float16",)),
    Row("phi3-export", "phi3", export=dict(refs=True), dtypes=("float16",), check=check_partial_rotary),
    Row("gemma3-export", "gemma3", export=dict(refs=True), config=dict(query_pre_attn_scalar=24), windows=(8, -1),
        dtypes=("float16",), check=check_gemma3_tables),
    Row("llama_tied-export", "llama_tied", export=dict(refs=True), dtypes=("float16",)),
    pytest.param(Row("llama-fp16", "llama", ckpt_dtype="float16", export=dict(native_dtype=True),
                     dtypes=("float16",), check=check_casts), marks=pytest.mark.slow),
    # More families per flavour: one export each, --runslow only (docs/support.md gives their last run).
    *(pytest.param(row, marks=pytest.mark.slow) for row in (
        Row("qwen2-opset23", "qwen2", export=dict(opset=23)),
        Row("qwen3-opset23", "qwen3", export=dict(opset=23), check=check_qk_norm_kept),
        Row("mistral_window-opset23", "mistral_window", export=dict(opset=23), windows=(8, 8)),
        Row("gemma-opset23", "gemma", export=dict(opset=23), heads=(4, 1, 32), check=check_gemma_embedding_scale),
        Row("phi3-torchscript", "phi3", export=dict(exporter="torchscript"), check=check_partial_rotary),
        Row("qwen3-torchscript", "qwen3", export=dict(exporter="torchscript"), check=check_qk_norm_kept),
        Row("mistral_window-torchscript", "mistral_window", export=dict(exporter="torchscript"), windows=(8, 8)),
        Row("gemma-torchscript", "gemma", export=dict(exporter="torchscript"), heads=(4, 1, 32),
            check=check_gemma_embedding_scale),
        Row("qwen2-kv-cache", "qwen2", export=dict(kv_cache=True), check=check_no_cache_io_left),
        Row("phi3-kv-cache", "phi3", export=dict(kv_cache=True), check=check_no_cache_io_left),
        Row("mistral_window-kv-cache", "mistral_window", export=dict(kv_cache=True), windows=(8, 8),
            check=check_no_cache_io_left),
        Row("qwen2-kv-cache-torchscript", "qwen2", export=dict(kv_cache=True, exporter="torchscript"),
            check=check_no_cache_io_left),
        Row("gemma3-kv-cache-torchscript", "gemma3", export=dict(kv_cache=True, exporter="torchscript"),
            config=dict(query_pre_attn_scalar=24), windows=(8, -1), check=check_no_cache_io_left),
        Row("qwen3-bf16", "qwen3", ckpt_dtype="bfloat16", export=dict(native_dtype=True), dtypes=("float16",),
            check=check_casts),
        Row("gemma3-bf16", "gemma3", ckpt_dtype="bfloat16", export=dict(native_dtype=True), dtypes=("float16",),
            config=dict(query_pre_attn_scalar=24), windows=(8, -1), check=check_casts),
    )),
]


def check_contract(model, row, target="edgellm-0.9"):
    plugins = [n for n in model.graph.node if n.op_type == "AttentionPlugin"]
    assert len(plugins) == LAYERS
    left = GONE_OPS & {n.op_type for n in model.graph.node}
    assert not left, f"the model's own attention/RoPE is still there: {left}"
    assert not [i.name for i in model.graph.input if i.name.startswith(GONE_INPUTS)]
    assert [o.name for o in model.graph.output] == ["logits"] + [f"present_key_values_{i}" for i in range(LAYERS)]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in p.attribute} for p in plugins]
    assert tuple(a["sliding_window_size"] for a in attrs) == row.windows
    if row.heads:
        assert all((a["num_q_heads"], a["num_kv_heads"], a["head_size"]) == row.heads for a in attrs)
    for a in attrs:
        assert a["num_q_heads"] % a["num_kv_heads"] == 0
        # 0.9.0: a non-default scale is pre-applied to q; 0.10 writes the attribute, no plugin_version
        assert ("attention_scale" in a) == (target == "edgellm-0.10") and "plugin_version" not in a


# Slow rows (--runslow) repeat what another row covers (eager: llama; native dtype: bf16; opset 23: llama)
# with one more dynamo export each.
CASES = [pytest.param(row, dt, id=f"{row.id}-{dt}", marks=marks)
         for row, marks in ((r.values[0], r.marks) if hasattr(r, "values") else (r, ()) for r in ROWS)
         for dt in row.dtypes]


@pytest.mark.parametrize("row,dtype", CASES)
def test_rewritten_and_verified(models, tmp_path, row, dtype):
    ckpt = row.checkpoint(models)
    out = tmp_path / "out"
    run = pipeline.rewrite(row.baseline(models), out, dtype=dtype)
    model = onnx.load(str(out / "model.onnx"))
    check_contract(model, row)
    if row.check:
        row.check(out, model, run, ckpt)
    res = verify(out, model=str(ckpt), steps=8, quiet=True, **row.verify_kw)
    assert res.passed, res.table()


# edgellm-0.10 (contract part 3 §17): every row again (slow where it is slow on 0.9), from the same session-cached
# export: the rewrite and verify add well under a second a row.
@pytest.mark.parametrize("row,dtype", CASES)
def test_rewritten_and_verified_on_010(models, tmp_path, row, dtype):
    ckpt = row.checkpoint(models)
    out = tmp_path / "out"
    run = pipeline.rewrite(row.baseline(models), out, dtype=dtype, target="edgellm-0.10")
    model = onnx.load(str(out / "model.onnx"))
    check_contract(model, row, "edgellm-0.10")
    assert "kv_page_table" in {i.name for i in model.graph.input}
    if row.check:
        row.check(out, model, run, ckpt)
    res = verify(out, model=str(ckpt), steps=8, quiet=True, **row.verify_kw)
    assert res.passed, res.table()


def test_llama3_scaling_baked_and_verified_with_the_runtime_input(models, tmp_path):
    """The runtime builds a plain table from config.json: the model's own table is baked, so verify passes
    with what the runtime feeds (tests/test_runtime_exact.py covers every target and the failure side)."""
    out = tmp_path / "out"
    run = pipeline.rewrite(models.baseline("llama3"), out, dtype="float32")
    check_contract(onnx.load(str(out / "model.onnx")), Row("llama3", "llama3"))
    assert [w for w in run.report.warnings if "head size 16" not in w] == []  # no RoPE warning left
    runtime = verify(out, model=str(models.checkpoint("llama3")), steps=8, quiet=True)
    assert runtime.passed, runtime.table()
    assert runtime.rope_table_difference < 1e-6


def test_verify_prompts_exceed_the_window():
    # mistral_window / gemma3 use an 8-token window; verify must run past it (prefill and decode).
    assert max(len(p) for p in prompts(320)) > 8


def test_kv_cache_export_whose_positions_ignore_the_past_is_refused(models, tmp_path):
    """The probe runs cache exports with 5 cached tokens: a graph that numbers new tokens from 0 again
    (positions = arange(S) instead of past + arange(S)) must not be fused."""
    import shutil

    from onnx_rewriter.errors import PatternMismatch

    base = models.baseline("llama", kv_cache=True)
    model = onnx.load(str(base), load_external_data=False)
    made = {o: n for n in model.graph.node for o in n.output}
    add = next(n for n in model.graph.node if n.op_type == "Add"
               and any(made.get(i) is not None and made[i].op_type == "Range" for i in n.input))
    arange = next(i for i in add.input if made.get(i) is not None and made[i].op_type == "Range")
    for n in model.graph.node:
        n.input[:] = [arange if i == add.output[0] else i for i in n.input]
    bad = tmp_path / "in"
    bad.mkdir()
    onnx.save(model, str(bad / "model.onnx"))
    shutil.copy(base.parent / "model.onnx.data", bad / "model.onnx.data")
    shutil.copy(base.parent / "config.json", bad / "config.json")
    with pytest.raises(PatternMismatch, match="cached tokens"):
        pipeline.rewrite(bad / "model.onnx", tmp_path / "out", dtype="float32")
    assert not (tmp_path / "out").exists()
