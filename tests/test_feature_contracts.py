"""Contract tests for the new features, one per bug class of issue 26, written from docs/contract.md.

Each test says which deliberate bug (tests/mutants.py) it is there to catch. The models are built here
(random non-zero biases, a non-round theta, YaRN) rather than taken from the shared tiny fixtures, so a
fixture that happens to hide a bug (all-zero biases, round constants) cannot make these pass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnx_rewriter import cli, safety, targets
from onnx_rewriter.analysis import constants as exact
from onnx_rewriter.errors import RewriteError, UnsupportedModel
from onnx_rewriter.pipeline import steps as pipeline
from onnx_rewriter.verification.llm import verify

from .test_errors import assert_refused

# K and N of every decoder linear a multiple of 128 (INT4 takes no other); N differs from K for gate/up/down.
INT4_DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8)


def _built(models, name: str, build) -> tuple[Path, Path]:
    """(checkpoint, baseline) that `build(folder)` makes, kept with the shared exports (tests/conftest.py
    Models: ONNX_REWRITER_TEST_MODELS keeps them across sessions, as tests/mutants.py runs them)."""
    root = models.root / "contracts" / name
    done = root.with_name(name + ".complete")
    if not done.is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        build(root)
        done.touch()
    return root / "ck", root / "base" / "model.onnx"


def _export(ckpt: Path, out: Path) -> Path:
    """The plain fp32 export of a checkpoint built here, side files beside it (as `make export` leaves them)."""
    from onnx_rewriter.hf.export import export_baseline, load_model

    out.mkdir(parents=True)
    export_baseline(load_model(str(ckpt), torch_dtype="float32")[0], out / "model.onnx")
    for f in ckpt.iterdir():
        if f.suffix in (".json", ".jinja") and f.name != "generation_config.json":
            shutil.copy(f, out / f.name)
    return out / "model.onnx"


# ------------------------------------------------------------------ FP8 KV scales: amax of the ROPED keys


def _hf_kv_amax(ckpt: Path, texts: list[str], max_tokens: int) -> np.ndarray:
    """[layers, 2] amax of K and V as transformers' own cache holds them (K after RoPE), computed here
    independently of the rewriter: the tokenizer and model of the checkpoint, nothing else."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    amax = np.zeros((model.config.num_hidden_layers, 2))
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
        with torch.no_grad():
            cache = model(torch.tensor([ids]), use_cache=True).past_key_values
        for i, layer in enumerate(cache.layers):
            amax[i, 0] = max(amax[i, 0], float(layer.keys.abs().max()))
            amax[i, 1] = max(amax[i, 1], float(layer.values.abs().max()))
    return amax


@pytest.fixture(scope="module")
def rope_sensitive_qwen2(models):
    """A tiny Qwen2 whose k bias puts the same large value on both halves of the fastest RoPE pair (dims 0
    and D/2 of every kv head): unroped, K peaks at that value; roped at an angle near 7pi/4 the pair adds up
    to ~1.4x it. So a k scale taken before RoPE is far off, whatever the random weights do."""
    from safetensors.numpy import load_file, save_file

    def build(root):
        ck = root / "ck"
        shutil.copytree(models.checkpoint("qwen2"), ck)
        cfg = json.loads((ck / "config.json").read_text())
        d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        state = load_file(str(ck / "model.safetensors"))
        for key in [k for k in state if k.endswith("k_proj.bias")]:
            b = state[key].copy()
            for h in range(b.shape[0] // d):
                b[h * d] = b[h * d + d // 2] = 4.0
            state[key] = b
        save_file(state, str(ck / "model.safetensors"), metadata={"format": "pt"})
        _export(ck, root / "base")

    return _built(models, "qwen2_rope_sensitive_k", build)


def test_fp8_kv_scales_are_amax_of_roped_k_and_of_v_over_448(rope_sensitive_qwen2, tmp_path):
    """Contract: calibrated scales are amax / 448 of the roped K and of V per layer. A k scale computed
    before RoPE is ~30% off on this model (and K then saturates); K and V swapped are far off."""
    from onnx_rewriter.features.calibration import DEFAULT_PROMPTS, MAX_TOKENS

    # one prompt a line: the bundled prompts with their own newlines made spaces, so both sides read the same texts
    texts = [p.replace("\n", " ") for p in DEFAULT_PROMPTS[:4]]
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n")
    ck, base = rope_sensitive_qwen2
    run = pipeline.rewrite(base, tmp_path / "out", target="edgellm-0.9", kv_cache="fp8",
                           calibration=str(tmp_path / "prompts.txt"))
    got = np.array(run.report.features["fp8_kv"]["scales"])
    want = _hf_kv_amax(ck, texts, MAX_TOKENS) / 448.0
    np.testing.assert_allclose(got, want, rtol=2e-3)


# ------------------------------------------------------------------ ViT attention with the scale split over q and k


def _split_scale_block(where: str, s: float):
    """The vit_graphs block with its scores' Mul replaced by sqrt(s) on q and on k: after the head
    transposes (as the sdpa export writes it) or before them, on the roped [T, H, D] tensors."""
    from tests.patterns.graphs import node
    from tests.patterns.vit_graphs import block

    g = block()
    r = np.float32(np.sqrt(s))
    node(g.scores).inputs[0] = g.qk  # no Mul on the scores
    if where == "after_transposes":
        node(g.qk).inputs[0] = g.b.op("Mul", g.qh, r)
        node(g.qk).inputs[1] = g.b.op("Mul", g.kt, r)
    else:
        node(g.qh).inputs[0] = g.b.op("Mul", g.q_rope.out, r)
        node(g.kt).inputs[0] = g.b.op("Mul", g.k_rope.out, r)
    return g


@pytest.mark.parametrize("where", ["after_transposes", "before_transposes"])
@pytest.mark.parametrize("s", [8 ** -0.5, 0.3])
def test_vit_attention_scale_split_over_q_and_k(where, s):
    """Contract: the plugin's attention_scale is the product of every factor on the scores, wherever the
    export put them (on q·k^T, on q' and k'^T, or on the roped q and k before the head transposes)."""
    from tests.patterns.graphs import node, reasons, result
    from tests.patterns.vit_graphs import run

    g = _split_scale_block(where, s)
    ctx = run(g.graph())
    assert not reasons(ctx, "vit_attention", node(g.prob))
    attn = result(ctx, "vit_attention", node(g.prob))
    assert attn.scale == pytest.approx(s, rel=1e-6)
    assert attn.k is g.k_rope.out and attn.q is g.q_rope.out  # the plugin reads the unscaled roped q, k


# ------------------------------------------------------------------ INT4 codes: w = (U - 8) · scale


def test_int4_rtn_codes_dequantize_to_the_weights_within_half_a_step():
    """Contract (docs/architecture.md): the runtime forms w[n, k] = (U[n, k] - 8) * scales[k // G, n]. The
    reference plugin and verify's oracle both dequantize with int4_layout.dequantize, so a wrong zero point
    there agrees with itself: only the weights themselves can tell."""
    from onnx_rewriter.features.int4 import layout as int4_layout

    rng = np.random.default_rng(2)
    w = (rng.standard_normal((256, 64)) * 0.05).astype(np.float16)
    u, scales = int4_layout.rtn(w)
    deq = int4_layout.dequantize(u, scales).astype(np.float32).T  # [K, N]
    step = np.repeat(scales.astype(np.float32), int4_layout.GROUP, axis=0)
    assert np.all(np.abs(deq - w.astype(np.float32)) <= 0.5 * step * (1 + 2 ** -9))
    assert not int4_layout.dequantize(np.full((4, 128), 8, np.uint8), np.ones((1, 4), np.float16)).any()


# ------------------------------------------------------------------ INT4 + LoRA: the slots' dims, and an adapter


def test_int4_lora_slots_have_the_linears_dims_and_an_adapter_verifies(models, tmp_path):
    """Contract: every linear (INT4 plugins included) gets `L.lora_A.weight` [K, rank] and `L.lora_B.weight`
    [rank, N] with its own K and N; a random adapter fed to them matches transformers + PEFT (merged), so
    the slots are checked with real ranks, not only with the rank-0 dummies."""
    from tests.test_lora import make_adapter

    base, ckpt = models.baseline("qwen2", **INT4_DIMS), models.checkpoint("qwen2", **INT4_DIMS)
    out = tmp_path / "out"
    pipeline.rewrite(base, out, target="edgellm-0.9", quantize="int4", lora=True)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "Int4GroupwiseGemmPlugin" for n in model.graph.node) == 14
    dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input if "lora" in i.name}
    kn = {"q_proj": (128, 128), "k_proj": (128, 128), "v_proj": (128, 128), "o_proj": (128, 128),
          "gate_proj": (128, 256), "up_proj": (128, 256), "down_proj": (256, 128)}
    want = {}
    for i in range(2):
        for mod, (k, n) in kn.items():
            stem = f"model.layers.{i}.{'self_attn' if mod[0] in 'qkvo' else 'mlp'}.{mod}"
            want[f"{stem}.lora_A.weight"] = [k, f"{stem}.rank"]
            want[f"{stem}.lora_B.weight"] = [f"{stem}.rank", n]
    assert dims == want
    adapter = make_adapter(ckpt, tmp_path / "adapter")
    res = verify(out, model=str(ckpt), lora_adapter=str(adapter), steps=2, quiet=True)
    assert res.passed, res.table()


# ------------------------------------------------------------------ reduced vocabulary: EOS id = V, Gemm lm_head


def test_eos_id_equal_to_the_vocabulary_size_is_refused_before_work(models, tmp_path, capsys, monkeypatch):
    """An EOS id equal to V lies outside [0, V): one `error:` line, exit 2, before the graph is rewritten."""
    base = tmp_path / "base"
    shutil.copytree(models.baseline("qwen2").parent, base)
    cfg = json.loads((base / "config.json").read_text())
    vocab = int(cfg["vocab_size"])
    cfg["eos_token_id"] = [2, vocab]
    (base / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "keep.txt").write_text("7 8 9\n")
    def build(run):
        pytest.fail("rewrote the graph")

    monkeypatch.setattr(pipeline, "STEPS", [build if s is pipeline.step_build else s for s in pipeline.STEPS])
    code = cli.main([str(base / "model.onnx"), str(tmp_path / "out"), "--reduce-vocab", "--keep-tokens",
                     str(tmp_path / "keep.txt")])
    err = capsys.readouterr().err
    assert_refused(code, err, f"token id {vocab}", "outside", str(vocab), exit_code=UnsupportedModel.exit_code)
    assert not (tmp_path / "out").exists()


def test_select_takes_v_minus_one_and_refuses_v(tmp_path):
    from transformers import AutoTokenizer

    from onnx_rewriter.features import reduced_vocab
    from onnx_rewriter.hf import tiny

    tok = AutoTokenizer.from_pretrained(str(tiny.build_tokenizer(tmp_path / "tok", chat_template=None)))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 319}))
    vmap, info = reduced_vocab.select(tok, 320, [], None, [tmp_path], None)
    assert 319 in vmap.tolist() and info["eos_ids"][-1] == 319
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 320}))
    with pytest.raises(RewriteError, match="token id 320 .* outside the model's vocabulary of 320"):
        reduced_vocab.select(tok, 320, [], None, [tmp_path], None)


def _gemm_head(trans_b: int, h: int = 6, v: int = 10):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((v, h) if trans_b else (h, v)).astype(np.float32)
    bias = rng.standard_normal(v).astype(np.float32)
    x = gs.Variable("hidden", np.float32, [3, h])
    y = gs.Variable("logits", np.float32, [3, v])
    gemm = gs.Node("Gemm", name="/lm_head/Gemm", inputs=[x, gs.Constant("lm_head.weight", w),
                                                          gs.Constant("lm_head.bias", bias)],
                   outputs=[y], attrs={"transB": trans_b})
    g = gs.Graph(nodes=[gemm], inputs=[x], outputs=[y])
    return g, gemm, w, bias


@pytest.mark.parametrize("trans_b", [1, 0])
def test_gemm_lm_head_keeps_the_rows_of_the_kept_tokens(trans_b):
    """Contract: lm_head's weight keeps the kept tokens' rows (Gemm: axis 0 with transB, 1 without), and so
    does a bias; logits index i is token vocab_map[i]."""
    from onnx_rewriter.features.reduced_vocab import ReducedVocab
    from onnx_rewriter.modelio import stream
    from onnx_rewriter.modelio.graph import lazy_proto

    g, gemm, w, bias = _gemm_head(trans_b)
    feat = ReducedVocab()
    feat.vocab_map, feat.vocab, feat.info = np.array([0, 3, 4, 9], np.int32), 10, {}
    run = SimpleNamespace(source=SimpleNamespace(base_dir=Path(".")), report=SimpleNamespace(features={}))
    build = SimpleNamespace(graph=g, logits=g.outputs[0], float_type=onnx.TensorProto.FLOAT)
    feat.apply(run, build)
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    full = x @ (w.T if trans_b else w) + bias
    cw, cb = (stream.produce(lazy_proto(c)) for c in gemm.inputs[1:])  # what the writer will write
    ours = x @ (cw.T if trans_b else cw) + cb
    np.testing.assert_allclose(ours, full[:, [0, 3, 4, 9]], rtol=1e-6)
    assert list(g.outputs[0].shape) == [3, 4]
    assert run.report.features["reduced_vocab"]["reduced_vocab_size"] == 4


def _gemm_head_baseline(src: Path, dst: Path) -> Path:
    """The baseline with lm_head as Reshape(x, [-1, H]) -> Gemm(transB=1) -> Reshape back to [B, S, V]:
    the only way a Gemm (2-D only) can be an LLM's lm_head."""
    from onnx import helper, numpy_helper

    shutil.copytree(src.parent, dst)
    m = onnx.load(str(dst / "model.onnx"))
    g = m.graph
    mm = next(n for n in g.node if g.output[0].name in n.output)
    assert mm.op_type == "MatMul"
    w = numpy_helper.to_array(next(t for t in g.initializer if t.name == mm.input[1]))
    g.node.remove(mm)
    consts = {"lm_head.weight_t": np.ascontiguousarray(w.T), "flat": np.array([-1, w.shape[0]], np.int64),
              "s0": np.array([0], np.int64), "s2": np.array([2], np.int64), "v": np.array([w.shape[1]], np.int64)}
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    x = mm.input[0]
    g.node.extend([
        helper.make_node("Reshape", [x, "flat"], ["lm_flat"], name="/lm_head/Reshape"),
        helper.make_node("Gemm", ["lm_flat", "lm_head.weight_t"], ["lm_2d"], name="/lm_head/Gemm", transB=1),
        helper.make_node("Shape", [x], ["x_shape"], name="/lm_head/Shape"),
        helper.make_node("Slice", ["x_shape", "s0", "s2"], ["bs"], name="/lm_head/Slice"),
        helper.make_node("Concat", ["bs", "v"], ["out_shape"], name="/lm_head/Concat", axis=0),
        helper.make_node("Reshape", ["lm_2d", "out_shape"], [g.output[0].name], name="/lm_head/Reshape_back")])
    for f in dst.glob("*.data"):
        f.unlink()
    onnx.save(m, str(dst / "model.onnx"))
    return dst / "model.onnx"


@pytest.mark.parametrize("reduce", [False, True])
def test_gemm_lm_head_between_reshapes_is_refused_by_name(models, tmp_path, capsys, reduce):
    """A Gemm lm_head needs Reshapes around it, which the plugin's last-token gather cannot see through:
    refused with one line naming the Gemm (it was 'is this a causal LM export?'), nothing written."""
    base = _gemm_head_baseline(models.baseline("llama"), tmp_path / "base")
    (tmp_path / "keep.txt").write_text("7 8 9\n")
    extra = ["--reduce-vocab", "--keep-tokens", str(tmp_path / "keep.txt")] if reduce else []
    code = cli.main([str(base), str(tmp_path / "out")] + extra)
    assert_refused(code, capsys.readouterr().err, "lm_head is a Gemm ('/lm_head/Gemm')", "MatMul")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ output paths: symlinks resolved, siblings allowed


def test_overlap_is_judged_on_resolved_paths(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    link = tmp_path / "link"
    link.symlink_to(ckpt)
    for out, folder in ((link / "out", ckpt), (ckpt / "out", link), (link, ckpt), (tmp_path, link)):
        with pytest.raises(RewriteError, match="the checkpoint"):
            safety.check_no_overlap(out, {"the checkpoint": folder})
    with pytest.raises(RewriteError, match="the --config file"):
        safety.check_no_overlap(tmp_path, files={"the --config file": link / "config.json"})


def test_sibling_whose_name_starts_with_the_checkpoints_is_allowed(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (tmp_path / "link").symlink_to(ckpt)
    for out in (tmp_path / "ckpt-edgellm", tmp_path / "ckpt2" / "out", tmp_path / "link-edgellm"):
        safety.check_no_overlap(out, {"the checkpoint": ckpt})
        safety.check_no_overlap(out, {"the checkpoint": tmp_path / "link"}, {"the --config file": ckpt / "c.json"})


def test_export_through_a_symlinked_checkpoint(models, tmp_path, capsys, monkeypatch):
    """`export --model LINK --output-dir LINK/out` writes into the checkpoint: refused before loading it;
    `--output-dir ckpt-edgellm` beside `ckpt` is a different folder and goes ahead."""
    import importlib

    export_mod = importlib.import_module("onnx_rewriter.hf.export")

    class Loaded(Exception):
        pass

    def load(*a, **k):
        raise Loaded

    monkeypatch.setattr(export_mod, "load_model", load)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(models.checkpoint("llama"), ckpt)
    link = tmp_path / "link"
    link.symlink_to(ckpt)
    for model, out in ((link, link / "out"), (ckpt, link / "out"), (link, ckpt)):
        code = cli.main(["export", "--model", str(model), "--output-dir", str(out)])
        assert_refused(code, capsys.readouterr().err, "the checkpoint")
    assert not (ckpt / "out").exists()
    with pytest.raises(Loaded):
        export_mod.export(str(ckpt), tmp_path / "ckpt-edgellm")


# ------------------------------------------------------------------ fused q/k/v with non-zero biases


@pytest.fixture(scope="module")
def biased_qwen2(models):
    """A tiny Qwen2 whose q, k and v biases are random and different (the shared fixture's are zero)."""
    from safetensors.numpy import load_file, save_file

    def build(root):
        ck = root / "ck"
        shutil.copytree(models.checkpoint("qwen2"), ck)
        state = load_file(str(ck / "model.safetensors"))
        rng = np.random.default_rng(5)
        for key in [k for k in state if k.endswith("_proj.bias")]:
            state[key] = (rng.standard_normal(state[key].shape) * 0.5).astype(state[key].dtype)
        save_file(state, str(ck / "model.safetensors"), metadata={"format": "pt"})
        _export(ck, root / "base")

    return _built(models, "qwen2_random_bias", build)


@pytest.mark.parametrize("target", ["edgellm-0.9", "edgellm-0.10", "edgellm-0.11"])
def test_fused_qkv_with_random_biases_verifies(biased_qwen2, tmp_path, target):
    """Contract: one qkv_proj MatMul + one Add of the concatenated biases [bq|bk|bv]; exact, so verify passes."""
    ck, base = biased_qwen2
    pipeline.rewrite(base, tmp_path / "out", target=target)
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert sum(n.name.endswith("qkv_proj/Add") for n in model.graph.node) == 2
    res = verify(tmp_path / "out", model=str(ck), steps=2, quiet=True)
    assert res.passed, res.table()


# ------------------------------------------------------------------ RoPE: non-round theta, YaRN attention_scaling


@pytest.mark.parametrize("theta", [999100.0, 12345.0, 1e6])
@pytest.mark.parametrize("dim", [16, 64])
def test_non_round_theta_is_not_snapped_to_a_round_one(theta, dim):
    """Without a config the shortest decimal that reproduces inv_freq (fp32 rounding) is written, so
    999100 stays 999100 (1e6 is 1e-3 off); a config theta that does not reproduce it is not taken."""
    inv = exact.inv_freq_of(theta, dim)
    assert exact.snap_theta(inv, dim)[0] == theta
    assert exact.snap_theta(inv, dim, config_thetas=[theta])[0] == theta
    if theta != 1e6:
        assert exact.snap_theta(inv, dim, config_thetas=[1e6])[0] == theta


@pytest.fixture(scope="module")
def yarn_llama(models):
    """A tiny Llama with YaRN RoPE (factor 4: attention_scaling 0.1·ln 4 + 1 = 1.139) and a non-round theta."""
    from onnx_rewriter.hf import tiny

    def build(root):
        # original context 1024 keeps the highest frequencies as they are (as on real YaRN models), which
        # is how theta is read back off the graph
        ck = tiny.build_checkpoint("llama", root / "ck", max_position_embeddings=4096, rope_parameters={
            "rope_type": "yarn", "rope_theta": 23456.0, "factor": 4.0, "original_max_position_embeddings": 1024})
        _export(ck, root / "base")

    return _built(models, "llama_yarn", build)


def test_yarn_table_carries_attention_scaling_and_verifies(yarn_llama, tmp_path):
    """Contract: a layer whose table the runtime cannot build (yarn) reads its own, baked, cos/sin times
    attention_scaling; verify compares logits and that table with the model's."""
    ck, base = yarn_llama
    out = tmp_path / "out"
    pipeline.rewrite(base, out, target="edgellm-0.9")
    model = onnx.load(str(out / "model.onnx"))
    baked = [t for t in model.graph.initializer if t.name.startswith("rope_rotary_cos_sin_layer")]
    assert len(baked) == 1
    table = onnx.numpy_helper.to_array(baked[0])[0]
    half = table.shape[-1] // 2
    np.testing.assert_allclose(np.hypot(table[:, :half], table[:, half:]), 0.1 * np.log(4.0) + 1.0, rtol=1e-5)
    res = verify(out, model=str(ck), steps=2, quiet=True)
    assert res.passed, res.table()


# ------------------------------------------------------------------ VLM: the M-RoPE checks and config keys


def _vlm_run(sections, interleaved, rotary_dim=64):
    rope = SimpleNamespace(mrope_section=list(sections), mrope_interleaved=interleaved)
    layers = [SimpleNamespace(index=i, rope=rope, rotary_dim=rotary_dim) for i in range(2)]
    return SimpleNamespace(layers=layers, source=SimpleNamespace(graph=gs.Graph()),
                           report=SimpleNamespace(features={}), hf_config={"model_type": "qwen3_vl"})


@pytest.mark.parametrize("sections,interleaved,refused", [
    ([16, 8, 8], False, None), ([24, 20, 20], True, None), ([20, 4, 8], False, "divisible by 8"),
    ([16, 8, 8], True, None)])
def test_mrope_sections_accepted_and_refused(sections, interleaved, refused):
    """Contract: non-interleaved sections not divisible by 8 are refused; Qwen3-VL's interleaved [24, 20, 20]
    is not a sectioned layout and is taken."""
    from onnx_rewriter.features.vlm import Vlm

    run = _vlm_run(sections, interleaved)
    if refused:
        with pytest.raises(UnsupportedModel, match=refused):
            Vlm().check(run, targets.get("edgellm-0.9"))
        return
    Vlm().check(run, targets.get("edgellm-0.9"))
    cfg: dict = {}
    Vlm().config(run, cfg)
    want = {"type": "default", "rope_type": "default", "mrope_section": sections}
    assert cfg["rope_scaling"] == ({**want, "mrope_interleaved": True} if interleaved else want)
    assert cfg["num_deepstack_features"] == 0 and cfg["model"] == "qwen3_vl"


@pytest.mark.parametrize("rotary_dim", [32, 96])
def test_mrope_rotary_width_the_runtime_cannot_build_is_refused(rotary_dim):
    from onnx_rewriter.features.vlm import Vlm

    with pytest.raises(UnsupportedModel, match=f"rotary dim {rotary_dim}"):
        Vlm().check(_vlm_run([rotary_dim // 4, rotary_dim // 8, rotary_dim // 8], False, rotary_dim),
                    targets.get("edgellm-0.9"))


# ------------------------------------------------------------------ ViTAttentionPlugin's attention_scale


@pytest.mark.parametrize("target", ["edgellm-0.9", "edgellm-0.10", "edgellm-0.11"])
def test_vit_plugin_scale_exact_default_or_refused_on_09(target):
    """Contract: attention_scale is 1/√D (exactly, when the graph holds it rounded to fp16 or fp32); another
    scale is written on 0.11 and refused on 0.9 (runtimes before 0.9.1 ignore the attribute)."""
    from onnx_rewriter.vision.rewrite import _scale

    target = targets.get(target)
    for held in (np.float16(32 ** -0.5), np.float32(32 ** -0.5)):
        assert _scale(SimpleNamespace(scale=float(held), head_size=32), 0, target) == 32 ** -0.5
    odd = SimpleNamespace(scale=0.3, head_size=32)
    if target.name == "edgellm-0.9":
        with pytest.raises(UnsupportedModel, match="vision block 0: attention scale 0.3"):
            _scale(odd, 0, target)
    else:
        assert _scale(odd, 0, target) == 0.3
