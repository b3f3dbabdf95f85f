"""Issue 25, items 1-3, 10, 12-14: each case asserts the exit code, the words of the message, that the
inputs are byte for byte unchanged and that nothing is left behind (output siblings, $TMPDIR)."""

from __future__ import annotations

import builtins
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from onnx_rewriter import cli, safety
from tests.support.paths import no_work, ours

from .test_errors import assert_no_output, assert_refused
from .test_safety import leftovers, tree

export_mod = importlib.import_module("onnx_rewriter.hf.export")
vlm_mod = importlib.import_module("onnx_rewriter.hf.vlm")
ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def vlm_ckpt(models, tmp_path):
    dst = tmp_path / "vlm"
    shutil.copytree(models.vlm_checkpoint("qwen2_5_vl"), dst)
    return dst




# ------------------------------------------------------------------ 1: --report overwrites any file


def test_report_never_replaces_the_input_model(base, tmp_path, private_tmp, capsys, monkeypatch):
    no_work(monkeypatch)
    before = tree(base.parent)
    code, _, err = run_cli(capsys, base, tmp_path / "out", "--report", base)
    assert_refused(code, err, "--report", "is the input model", "choose another file")
    code, _, err = run_cli(capsys, base, tmp_path / "out", "--report", base.parent / "config.json", "--force")
    assert_refused(code, err, "--report", "config.json", "not a report onnx_rewriter wrote", "never replaced")
    assert tree(base.parent) == before and ours(private_tmp) == []
    assert_no_output(tmp_path / "out")


def test_report_never_writes_into_the_checkpoint(ckpt, tmp_path, private_tmp, capsys, monkeypatch):
    no_work(monkeypatch)
    before = tree(ckpt)
    for report in (ckpt / "config.json", ckpt / "new-report.json"):
        code, _, err = run_cli(capsys, "export", "--model", ckpt, "--output-dir", tmp_path / "out", "--report", report)
        assert_refused(code, err, "--report", "lies inside the checkpoint")
    assert tree(ckpt) == before and not (ckpt / "new-report.json").exists() and ours(private_tmp) == []


def test_report_never_replaces_a_file_of_an_output(base, tmp_path, capsys):
    """`--force --report out/model.onnx`: refused before the run, the earlier output stays whole."""
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, base, out, "-q")
    assert code == 0, err
    before = tree(out)
    code, _, err = run_cli(capsys, base, out, "--force", "--report", out / "model.onnx")
    assert_refused(code, err, "--report", "lies inside the output folder")
    assert tree(out) == before and leftovers(tmp_path) == []


def test_report_replaces_its_own_earlier_report(base, tmp_path, capsys):
    """A report of this tool is replaced (rerunning with the same --report is the common case), atomically."""
    rep = tmp_path / "r.json"
    rep.write_text(json.dumps({"layers": [], "status": "refused"}))
    code, _, err = run_cli(capsys, base, tmp_path / "out", "--report", rep, "-q")
    assert code == 0, err
    assert json.loads(rep.read_text())["status"] == "rewritten"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.json")] == []


# ------------------------------------------------------------------ 2: code from a model folder


EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _evil_tokenizer(folder: Path, marker: Path) -> None:
    """A tokenizer whose class is the folder's own code (auto_map to tokenization_evil.py)."""
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "tokenization_evil.py").write_text(EVIL.format(marker=str(marker)))


@pytest.fixture
def never_ask(monkeypatch):
    """transformers asks on a terminal (input()): no run may ever get there."""
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("asked the user to run the folder's code"))


def test_rewrite_runs_no_folder_code_without_the_option(base, tmp_path, capsys, never_ask, monkeypatch):
    monkeypatch.setenv("ONNX_REWRITER_NO_TOKENIZER_JOB", "1")  # in-process, where input() is patched
    marker = tmp_path / "RAN"
    _evil_tokenizer(base.parent, marker)
    before = tree(base.parent)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, base, out)
    assert_refused(code, err, str(base.parent), "own python code", "--trust-remote-code")
    assert "tokenizer files" not in err.splitlines()[-1]  # not blamed on the files: on the missing option
    assert not marker.exists() and tree(base.parent) == before
    assert_no_output(out)
    code, _, err = run_cli(capsys, base, out, "--trust-remote-code", "-q")
    assert code == 0, err
    assert marker.exists() and (out / "tokenizer.json").is_file()


def test_rewrite_child_process_refuses_too(base, tmp_path, private_tmp, capsys, monkeypatch):
    """The `rewrite` CLI loads the tokenizer in a child process: same refusal, and its scratch folder goes."""
    monkeypatch.delenv("ONNX_REWRITER_NO_TOKENIZER_JOB", raising=False)
    marker = tmp_path / "RAN"
    _evil_tokenizer(base.parent, marker)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "onnx_rewriter", str(base), str(out)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert_refused(proc.returncode, proc.stderr, "own python code", "--trust-remote-code")
    assert not marker.exists() and ours(private_tmp) == []
    assert_no_output(out)


def test_export_runs_no_folder_code_without_the_option(ckpt, tmp_path, private_tmp, capsys, never_ask, monkeypatch):
    no_work(monkeypatch)
    marker = tmp_path / "RAN"
    _evil_tokenizer(ckpt, marker)
    before = tree(ckpt)
    code, _, err = run_cli(capsys, "export", "--model", ckpt, "--output-dir", tmp_path / "out")
    assert_refused(code, err, str(ckpt), "own python code", "--trust-remote-code")
    assert not marker.exists() and tree(ckpt) == before and ours(private_tmp) == []
    assert_no_output(tmp_path / "out")


def test_no_prompt_even_where_an_argument_is_left_out(ckpt, tmp_path, never_ask):
    """Belt and braces: once loading went through safety.remote_code, an unset trust_remote_code refuses."""
    from transformers import AutoTokenizer

    _evil_tokenizer(ckpt, tmp_path / "RAN")
    safety.remote_code(False)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoTokenizer.from_pretrained(ckpt)
    assert not (tmp_path / "RAN").exists()


def test_every_loading_command_has_the_option():
    for cmd in ("rewrite", "export", "verify"):
        assert "--trust-remote-code" in cli.build_parser(cmd).format_help()


# ------------------------------------------------------------------ 3: the VLM route's written paths


def test_vlm_keep_baseline_rules_before_the_export(vlm_ckpt, tmp_path, private_tmp, capsys, monkeypatch):
    no_work(monkeypatch)
    before = tree(vlm_ckpt)
    out = tmp_path / "out"
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    cases = [(out, "is the output folder"), (vlm_ckpt / "kept", "lies inside the checkpoint"),
             (user, "files onnx_rewriter did not write")]
    for keep, words in cases:
        code, _, err = run_cli(capsys, "export", "--model", vlm_ckpt, "--output-dir", out, "--keep-baseline", keep,
                               "--force")
        assert_refused(code, err, "--keep-baseline folder", words)
    assert tree(vlm_ckpt) == before and (user / "notes.txt").read_text() == "mine"
    assert not (vlm_ckpt / "kept").exists() and ours(private_tmp) == []
    assert_no_output(out)


def test_vlm_device_and_checkpoint_checked_like_text(vlm_ckpt, tmp_path, capsys, monkeypatch):
    no_work(monkeypatch)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", "--model", vlm_ckpt, "--output-dir", out, "--device", "tpu")
    assert_refused(code, err, "unknown --device 'tpu'")
    data = vlm_ckpt / "model.safetensors"
    with open(data, "r+b") as fh:
        fh.truncate(data.stat().st_size // 2)
    code, _, err = run_cli(capsys, "export", "--model", vlm_ckpt, "--output-dir", out)
    assert_refused(code, err, "model.safetensors", "truncated")
    assert_no_output(out)


# ------------------------------------------------------------------ 10: temporary folders


def test_tokenizer_child_scratch_removed_when_killed(base, private_tmp):
    from onnx_rewriter.sidefiles import tokenizer_job

    job = tokenizer_job.Job(base.parent, "chat_template.jinja")
    assert ours(private_tmp)[0].startswith(f"onnx_rewriter_tokenizer_pid{os.getpid()}_")
    job.close()  # what a failed rewrite does: the child is SIGKILLed mid-work
    assert ours(private_tmp) == []


def test_stale_temp_folders_of_dead_runs_are_removed(private_tmp):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = private_tmp / f"onnx_rewriter_tokenizer_pid{int(dead.stdout)}_x1"
    stale.mkdir()
    other = private_tmp / "onnx_rewriter_tokenizer_abc"  # not ours to judge: kept
    other.mkdir()
    with safety.temp_folder("export") as work:
        assert work.is_dir() and not stale.exists()
    assert ours(private_tmp) == ["onnx_rewriter_tokenizer_abc"]




def test_sigterm_leaves_no_temp_folder(base, tmp_path, private_tmp):
    from .support.processes import signal_mid_write, start_mid_write

    out = tmp_path / "out"
    proc, flag = start_mid_write(tmp_path, [base, out])
    code, err = signal_mid_write(proc, flag, signal.SIGTERM)
    assert code == 130 and err.strip().splitlines()[-1].startswith("error: interrupted"), err[-2000:]
    assert ours(private_tmp) == []
    assert_no_output(out)


# ------------------------------------------------------------------ 12: two runs, one folder; --report OUT


def test_second_run_into_the_same_new_folder_is_refused(base, tmp_path, capsys, monkeypatch):
    """Run B starts while the folder is new, run A finishes first: B must not replace A's folder."""
    out = tmp_path / "out"

    from onnx_rewriter.modelio import graph

    save = graph.save

    def other_run_finishes_meanwhile(*a, **k):  # B writes its temporary folder while A renames its own
        files = save(*a, **k)
        out.mkdir()
        (out / "model.onnx").write_bytes(b"run A")
        safety.write_manifest(out)
        return files

    monkeypatch.setattr(graph, "save", other_run_finishes_meanwhile)
    code, _, err = run_cli(capsys, base, out)
    assert_refused(code, err, "holds an earlier onnx_rewriter output", "--force", "another run wrote it")
    assert (out / "model.onnx").read_bytes() == b"run A" and leftovers(tmp_path) == []


def test_report_naming_the_output_folder_leaves_nothing(base, tmp_path, capsys, monkeypatch):
    no_work(monkeypatch)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, base, out, "--report", out)
    assert_refused(code, err, "--report", "is the output folder")
    assert_no_output(out)


def test_temp_names_carry_the_pid():
    with safety.temp_folder("x") as p:
        assert p.name.startswith(f"onnx_rewriter_x_pid{os.getpid()}_")
    assert not p.exists()


# ------------------------------------------------------------------ 13: messages that name the real cause


def test_index_naming_a_missing_shard(ckpt, tmp_path, capsys, monkeypatch):
    no_work(monkeypatch)
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.layers.1.mlp.down_proj.weight": "model-00002-of-00002.safetensors"}}))
    before = tree(ckpt)
    code, _, err = run_cli(capsys, "export", "--model", ckpt, "--output-dir", tmp_path / "out")
    assert_refused(code, err, "model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing",
                   "download")
    assert "num_hidden_layers" not in err and tree(ckpt) == before
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("route", ["rewrite", "export"])
def test_config_vocab_size_as_a_string_blames_config(base, ckpt, tmp_path, capsys, monkeypatch, route):
    if route == "export":
        no_work(monkeypatch)
    folder = base.parent if route == "rewrite" else ckpt
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = str(cfg["vocab_size"])
    (folder / "config.json").write_text(json.dumps(cfg))
    before = tree(folder)
    out = tmp_path / "out"
    argv = [base, out] if route == "rewrite" else ["export", "--model", ckpt, "--output-dir", out]
    code, _, err = run_cli(capsys, *argv)
    assert_refused(code, err, "config.json", "vocab_size", "fix config.json")
    assert "tokenizer files" not in err and tree(folder) == before
    assert_no_output(out)


@pytest.mark.parametrize("route", ["rewrite", "export"])
def test_dangling_chat_template_link(base, ckpt, tmp_path, capsys, monkeypatch, route):
    if route == "export":
        no_work(monkeypatch)
    folder = base.parent if route == "rewrite" else ckpt
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "chat_template.jinja").symlink_to(tmp_path / "gone.jinja")
    out = tmp_path / "out"
    argv = [base, out] if route == "rewrite" else ["export", "--model", ckpt, "--output-dir", out]
    code, _, err = run_cli(capsys, *argv)
    assert_refused(code, err, "chat_template.jinja", "link", "does not exist", "--no-tokenizer")
    assert "neutral" not in err
    assert_no_output(out)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_external_data_that_is_not_a_file(base, tmp_path, capsys, kind):
    data = base.parent / "model.onnx.data"
    data.unlink()
    if kind == "fifo":
        os.mkfifo(data)
    else:
        data.symlink_to("/dev/zero")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, base, out)
    assert_refused(code, err, "model.onnx.data", "not a regular file")
    assert "missing" not in err.splitlines()[-1]
    assert_no_output(out)


def test_console_script_names_itself(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/onnx-rewriter"])
    code, _, err = run_cli(capsys, "export")
    assert_refused(code, err, "see onnx-rewriter export --help")
    assert "python -m" not in err
    monkeypatch.setattr(sys, "argv", ["/x/onnx_rewriter/__main__.py"])
    code, _, err = run_cli(capsys, "export")
    assert_refused(code, err, "see python -m onnx_rewriter export --help")


# ------------------------------------------------------------------ 14: nothing silently ignored


@pytest.mark.parametrize("argv,words", [
    (["--int4-plugin-version", "1"], ["--int4-plugin-version 1", "needs --quantize int4"]),
    (["--calibration", "{cal}"], ["--calibration", "only to calibrate", "drop --calibration"]),
    (["--calibration", "{cal}", "--quantize", "int4"], ["--calibration", "drop --calibration"]),
])
def test_options_that_would_change_nothing_are_refused(base, tmp_path, capsys, monkeypatch, argv, words):
    no_work(monkeypatch)
    cal = tmp_path / "cal.txt"
    cal.write_text("hello\n")
    before = tree(base.parent)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, base, out, *[a.format(cal=cal) for a in argv])
    assert_refused(code, err, *words)
    assert tree(base.parent) == before
    assert_no_output(out)


def test_int4_plugin_version_on_a_one_layout_target_warns(models, tmp_path, capsys):
    from .test_int4 import DIMS

    code, _, err = run_cli(capsys, models.baseline("qwen2", **DIMS), tmp_path / "out", "--quantize", "int4",
                           "--int4-plugin-version", "1", "--target", "edgellm-0.9")
    assert code == 0, err
    assert "WARNING: --int4-plugin-version 1: edgellm-0.9 has one INT4 layout" in err


@pytest.fixture(scope="module")
def bad_weights(models, tmp_path_factory):
    """The llama baseline with one weight above fp16's range (the embedding) and one NaN (a linear), rewritten
    with --external-data."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    src = models.baseline("llama")
    root = tmp_path_factory.mktemp("bad_weights")
    base = root / "base"
    base.mkdir()
    model = onnx.load(str(src))
    picked = {}
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and len(picked) < 2:
            a = numpy_helper.to_array(t).copy()
            a.flat[0] = 1e6 if not picked else np.nan
            picked[t.name] = "inf" if not picked else "nan"
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(model, str(base / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    models.copy_side_files(models.checkpoint("llama"), base)
    out = root / "out"
    code = cli.main([str(base / "model.onnx"), str(out), "--external-data"])
    return code, out, picked, root


def test_weights_outside_fp16_and_nan_warn(bad_weights, capsys):
    code, out, picked, root = bad_weights
    assert code == 0
    report = root / "r.json"
    # the warnings are in the folder's report too: rerun into another folder with --report
    code = cli.main([str(root / "base" / "model.onnx"), str(root / "out2"), "--report", str(report), "-q"])
    assert code == 0
    warnings = json.loads(report.read_text())["warnings"]
    nan = [w for w in warnings if "are NaN" in w]
    big = [w for w in warnings if "outside fp16's range" in w]
    assert len(nan) == 1 and "check the checkpoint" in nan[0]
    assert len(big) == 1 and "embed_tokens" in big[0] and "--dtype float32" in big[0]


def test_external_data_in_a_small_model_holds_its_weights(bad_weights):
    """--external-data on a tiny model: the weights go to model.onnx.data (it was written empty, 0 bytes)."""
    import onnx

    code, out, _, _ = bad_weights
    assert code == 0
    assert (out / "model.onnx.data").stat().st_size > 0
    assert "model.onnx.data" in json.loads((out / safety.MANIFEST).read_text())["files"]
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(np_numel(t) > 1024 for t in external)


def np_numel(t) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def test_no_empty_data_file_when_nothing_is_large(tmp_path):
    """The safety net: a model whose weights all stay inline gets no 0-byte model.onnx.data."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from onnx_rewriter.modelio import graph

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 4])], [w])
    files = graph.save(helper.make_model(g), tmp_path / "model.onnx", tmp_path, onnx.TensorProto.FLOAT, True)
    assert files == ["model.onnx"] and not (tmp_path / "model.onnx.data").exists()


def test_verify_nan_rows_never_read_same():
    import numpy as np

    from onnx_rewriter.verification.compare import VerifyResult, compare

    nan = np.full(8, np.nan, np.float32)
    s = compare("prefill[0]", nan, nan)
    assert not s.top1_agree
    r = VerifyResult()
    r.steps = [s]
    row = r.table().splitlines()[1]
    assert row.split()[-1] == "NaN" and "same" not in row


def test_verify_fp16_model_on_an_fp16_folder_is_refused(bad_weights, models, capsys):
    _, out, _, _ = bad_weights
    ckpt = models.checkpoint("llama")
    code, _, err = run_cli(capsys, "verify", out, "--model", ckpt, "--fp16-model", ckpt)
    assert_refused(code, err, "--fp16-model", "no INT4 linears", "--model alone")
