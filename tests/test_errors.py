"""Every bad input ends in one line `error: ...` naming the problem and the fix, a non-zero exit code,
no traceback, and no output folder (nor a temporary one) left behind.

The CLI runs in-process (`cli.main`), so an uncaught exception would fail the test rather than hide in
a subprocess's stderr.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_rewriter import cli
from onnx_rewriter.pipeline import steps as pipeline


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, *words, exit_code=2):
    """Exit code, one `error:` line at the end naming `words`, no traceback."""
    assert code == exit_code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1
    for w in words:
        assert w.lower() in last.lower(), (w, last)
    return last


def assert_no_output(out):
    """Neither the output folder nor a temporary sibling (`.NAME.tmp-*`) exists."""
    assert not out.exists()
    if out.parent.exists():
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def llama(models):
    return models.baseline("llama")


def _copy_baseline(src, dst, with_data=True, with_config=True):
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst / "model.onnx")
    if with_data:
        shutil.copy(src.parent / "model.onnx.data", dst / "model.onnx.data")
    if with_config:
        shutil.copy(src.parent / "config.json", dst / "config.json")
    return dst / "model.onnx"


# ------------------------------------------------------------------ the input file


def test_missing_input(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, tmp_path / "nope.onnx", out)
    assert_refused(code, err, "does not exist", ".onnx")
    assert_no_output(out)


def test_not_onnx(tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("these are meeting notes, not a model\n" * 20)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, bad, out)
    assert_refused(code, err, "onnx")
    assert_no_output(out)


def test_truncated_onnx(llama, tmp_path, capsys):
    data = llama.read_bytes()
    bad = tmp_path / "model.onnx"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, bad, out)
    assert_refused(code, err, "not a readable onnx", "re-export")
    assert_no_output(out)


def test_missing_external_data(llama, tmp_path, capsys):
    model = _copy_baseline(llama, tmp_path / "in", with_data=False)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, model, out)
    assert_refused(code, err, "model.onnx.data", "missing", "copy it beside")
    assert_no_output(out)


def test_truncated_external_data(llama, tmp_path, capsys):
    model = _copy_baseline(llama, tmp_path / "in")
    data = model.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, model, out)
    assert_refused(code, err, "truncated", "re-export")
    assert_no_output(out)


@pytest.mark.parametrize("where", ["../model.onnx.data", "/tmp/model.onnx.data"])
def test_external_data_outside_the_model_folder(llama, tmp_path, capsys, where):
    model = _copy_baseline(llama, tmp_path / "in")
    proto = onnx.load(str(model), load_external_data=False)
    t = next(t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    next(e for e in t.external_data if e.key == "location").value = where
    onnx.save(proto, str(model))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, model, out)
    assert_refused(code, err, where, "outside the model's folder")
    assert_no_output(out)


def _cnn(path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((4, 10)).astype(np.float32), "fc")
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], [w, fc])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_graph_without_attention(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, _cnn(tmp_path / "cnn.onnx"), out)
    assert_refused(code, err, "no attention", "decoder llm")
    assert_no_output(out)


def break_rotate_half(src, dst, which: int = 2):
    """Copy of a llama baseline whose `which`-th rotate_half lost its Neg (index 2: layer 1's q)."""
    model = onnx.load(str(src), load_external_data=False)
    negs = [n for n in model.graph.node if n.op_type == "Neg"]
    neg = negs[which]
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name == neg.output[0]:
                n.input[i] = neg.input[0]
    model.graph.node.remove(neg)
    dst.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst / "model.onnx"))
    shutil.copy(src.parent / "model.onnx.data", dst / "model.onnx.data")
    return dst / "model.onnx"


def test_partial_match_names_the_layer(llama, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, break_rotate_half(llama, tmp_path / "in"), out)
    last = assert_refused(code, err, "layer 1", "does not match", "rotate_half")
    assert "Neg" in last  # the failed check names what it expected
    assert_no_output(out)


def test_interleaved_rope_refused(models, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, models.baseline("gptj"), out)
    assert_refused(code, err, "interleaved", "GPT-J")
    assert_no_output(out)


def test_soft_capping_refused(models, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, models.baseline("gemma2", attn="eager"), out)
    assert_refused(code, err, "soft-capping")
    assert_no_output(out)


@pytest.fixture(scope="module")
def nonuniform(models, tmp_path_factory):
    """A real export of a 2-layer llama whose layer 1 has 4 kv heads (layer 0: 2)."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    from onnx_rewriter.hf.export import export_baseline, load_model

    model, _ = load_model(str(models.checkpoint("llama")))
    cfg = copy.deepcopy(model.config)
    cfg.num_key_value_heads = 4
    model.model.layers[1].self_attn = LlamaAttention(cfg, layer_idx=1).eval()
    out = tmp_path_factory.mktemp("nonuniform")
    return export_baseline(model, out / "model.onnx")


def test_nonuniform_heads_refused(nonuniform, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, nonuniform, out)
    assert_refused(code, err, "layer 1", "uniform")
    assert_no_output(out)


# ------------------------------------------------------------------ options


def test_unknown_target(llama, tmp_path, capsys, monkeypatch):
    def never(run):
        raise AssertionError("an unknown target must fail before loading")

    monkeypatch.setattr(pipeline, "STEPS", [never])
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, llama, out, "--target", "edgellm-9.9")
    assert_refused(code, err, "--target", "invalid choice: 'edgellm-9.9'", "edgellm-0.9")
    with pytest.raises(pipeline.RewriteError, match="unknown target 'edgellm-9.9'"):
        pipeline.rewrite(llama, out, target="edgellm-9.9")
    assert_no_output(out)


def test_config_contradicts_graph(llama, tmp_path, capsys):
    cfg = json.loads((llama.parent / "config.json").read_text())
    cfg["num_attention_heads"] = 8
    (tmp_path / "other.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, llama, out, "--config", tmp_path / "other.json")
    assert_refused(code, err, "num_attention_heads=8", "num_attention_heads=4")
    assert_no_output(out)


def test_output_folder_not_empty(llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for force in ([], ["--force"]):  # a folder this tool did not write is never replaced
        code, _, err = run_cli(capsys, llama, out, *force)
        assert_refused(code, err, "'keep.txt'", "did not write", "choose another folder")
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_output_under_a_file(llama, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub" / "out"
    code, _, err = run_cli(capsys, llama, out)
    assert_refused(code, err, "cannot create the output folder", "is a file")
    assert (tmp_path / "afile").read_text() == "x"


def test_output_folder_not_writable(llama, tmp_path):
    import subprocess
    import sys

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    # Root (how CI runs) ignores permission bits: the child runs without the capability that allows it.
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    try:
        proc = subprocess.run(drop + [sys.executable, "-m", "onnx_rewriter", str(llama), str(ro / "out")],
                              capture_output=True, text=True, timeout=120)
        assert_refused(proc.returncode, proc.stderr, "cannot write", "choose another output folder")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_output_on_unwritable_filesystem(llama, tmp_path, capsys):
    # /proc takes no new folders even for root: the writability probe must notice before any work.
    out = __import__("pathlib").Path("/proc/onnx_rewriter_test_out")
    if not out.parent.is_dir():
        pytest.skip("no /proc")
    code, _, err = run_cli(capsys, llama, out)
    assert_refused(code, err, "cannot write", "choose another output folder")
    assert not out.exists()


# ------------------------------------------------------------------ export and verify


def test_hub_id_without_network_fails_fast(tmp_path, capsys, monkeypatch):
    """No network and no HF_HUB_OFFLINE: the CLI notices by itself instead of retrying for ~30 s."""
    import socket

    export_mod = importlib.import_module("onnx_rewriter.hf.export")  # the package re-exports a function of that name

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for var in export_mod._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)

    def no_network(*a, **k):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    export_mod._offline_reason.cache_clear()
    out = tmp_path / "out"
    t0 = time.perf_counter()
    try:
        code, _, err = run_cli(capsys, "export", "--model", "some-org/some-model", "--output_dir", out)
    finally:
        export_mod._offline_reason.cache_clear()
    assert time.perf_counter() - t0 < 10
    assert_refused(code, err, "some-org/some-model", "unreachable", "local folder")
    assert_no_output(out)


def test_hub_id_offline_mode(tmp_path, capsys, monkeypatch):
    export_mod = importlib.import_module("onnx_rewriter.hf.export")  # the package re-exports a function of that name

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export_mod._offline_reason.cache_clear()
    out = tmp_path / "out"
    try:
        code, _, err = run_cli(capsys, "export", "--model", "some-org/some-model", "--output_dir", out)
    finally:
        export_mod._offline_reason.cache_clear()
    assert_refused(code, err, "HF_HUB_OFFLINE", "local folder")
    assert_no_output(out)


def test_unsupported_architecture_checkpoint(tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    ckpt = tmp_path / "t5"
    cfg = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(cfg).save_pretrained(ckpt)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", "--model", ckpt, "--output_dir", out)
    assert_refused(code, err, "t5", "decoder-only")
    assert_no_output(out)


def test_export_unknown_target_fails_before_loading(tmp_path, capsys, monkeypatch):
    export_mod = importlib.import_module("onnx_rewriter.hf.export")  # the package re-exports a function of that name

    monkeypatch.setattr(export_mod, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", "--model", tmp_path, "--output_dir", out, "--target", "nope")
    assert_refused(code, err, "--target", "invalid choice: 'nope'")
    assert_no_output(out)


@pytest.mark.parametrize("missing", ["model.onnx", "config.json"])
def test_verify_folder_without_outputs(llama, tmp_path, capsys, missing):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("model.onnx", "config.json", "embedding.safetensors"):
        if name != missing:
            (folder / name).write_text("{}")
    code, _, err = run_cli(capsys, "verify", folder, "--baseline", llama)
    assert_refused(code, err, f"has no {missing}", "onnx_rewriter")


def test_verify_missing_baseline(tmp_path, capsys, llama):
    out = tmp_path / "out"
    pipeline.rewrite(llama, out, dtype="float32")
    code, _, err = run_cli(capsys, "verify", out, "--baseline", tmp_path / "nope.onnx")
    assert_refused(code, err, "does not exist")


# ------------------------------------------------------------------ bugs stay one line too


def test_internal_error_is_one_line(llama, tmp_path, capsys, monkeypatch):
    def boom(run):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(pipeline, "step_normalize", boom)
    monkeypatch.setattr(pipeline, "STEPS", [pipeline.step_load, boom])
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, llama, out)
    last = assert_refused(code, err, "internal error", "ValueError: boom second line", "--debug", exit_code=3)
    assert last.count("\n") == 0
    assert_no_output(out)
    with pytest.raises(ValueError):
        cli.main([str(llama), str(out), "--debug"])
