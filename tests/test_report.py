"""The match report (--report JSON and the stderr table, also for refused runs), `inspect`, and logging."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from onnx import numpy_helper

from .test_errors import _cnn, break_rotate_half, run_cli


@pytest.fixture(scope="module")
def llama(models):
    return models.baseline("llama")


def test_report_of_a_rewrite(llama, tmp_path, capsys):
    rep = tmp_path / "report.json"
    code, out, err = run_cli(capsys, llama, tmp_path / "out", "--report", rep)
    assert code == 0, err
    data = json.loads(rep.read_text())
    assert data["status"] == "rewritten" and data["error"] is None
    assert [l["index"] for l in data["layers"]] == [0, 1]
    for layer in data["layers"]:
        assert layer["rewritten"] and layer["reason"] is None
        assert {"rotate_half", "repeat_kv", "attention_core", "attention_layer"} <= set(layer["patterns"])
    assert "rewritten" in err and "rotate_half" in err  # the readable table
    assert "rewrote 2/2 layers" in out


def test_report_of_a_refused_run(llama, tmp_path, capsys):
    broken = break_rotate_half(llama, tmp_path / "in")
    rep, out = tmp_path / "report.json", tmp_path / "out"
    code, _, err = run_cli(capsys, broken, out, "--report", rep)
    assert code == 2 and not out.exists()
    data = json.loads(rep.read_text())
    assert data["status"] == "refused" and "layer 1" in data["error"]
    l0, l1 = data["layers"]
    assert l0["rewritten"] and "rotate_half" in l0["patterns"]
    assert not l1["rewritten"] and l1["patterns"] == []
    # the first failed check, and the node it failed at
    assert "expected Neg" in l1["reason"] and "node '" in l1["reason"]
    table = err.strip().splitlines()[:-1]
    assert any(line.split()[:2] == ["1", "REFUSED"] for line in table), err
    assert any(line.split()[:2] == ["0", "matched"] for line in table), err


def test_refused_report_before_any_layer(tmp_path, capsys):
    rep = tmp_path / "report.json"
    code, _, err = run_cli(capsys, _cnn(tmp_path / "cnn.onnx"), tmp_path / "out", "--report", rep)
    assert code == 2
    data = json.loads(rep.read_text())
    assert data["status"] == "refused" and "no attention" in data["error"] and data["layers"] == []


def test_inspect_shows_config_and_layers(llama, tmp_path, capsys):
    before = sorted(p.name for p in llama.parent.iterdir())
    code, out, err = run_cli(capsys, "inspect", llama)
    assert code == 0, err
    fields = {line.strip().rsplit(None, 1)[0]: line.strip().rsplit(None, 1)[1]
              for line in out.splitlines() if line.startswith("  ") and "status" not in line
              and not line.strip()[0].isdigit()}
    assert fields["q heads"] == "4" and fields["kv heads"] == "2" and fields["head size"] == "16"
    assert fields["rotary dims"] == "16" and fields["layers"] == "2" and fields["vocab"] == "320"
    assert fields["hidden size"] == "64" and float(fields["rope theta"]) == 10000.0
    assert "sliding window" in out
    assert "verdict: would rewrite all 2 layers" in out
    assert sorted(p.name for p in llama.parent.iterdir()) == before  # wrote nothing


def test_inspect_explains_a_partial_match(llama, tmp_path, capsys):
    broken = break_rotate_half(llama, tmp_path / "in")
    before = sorted(p.name for p in (tmp_path / "in").iterdir())
    code, out, _ = run_cli(capsys, "inspect", broken)
    assert code == 1  # it would NOT rewrite
    rows = [line.split() for line in out.splitlines()]
    assert ["0", "matched"] in [r[:2] for r in rows] and ["1", "REFUSED"] in [r[:2] for r in rows]
    assert "verdict: would NOT rewrite" in out and "layer 1" in out
    assert "q heads" in out  # dimensions still read off the layers that matched
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == before


def test_inspect_of_a_non_llm(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "inspect", _cnn(tmp_path / "cnn.onnx"))
    assert code == 1 and "would NOT rewrite: no attention" in out


def test_inspect_missing_input_is_an_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", tmp_path / "nope.onnx")
    assert code == 2 and err.strip().startswith("error: ") and "does not exist" in err


# ------------------------------------------------------------------ logging


def _scaled_rope_copy(llama, dst):
    """The llama baseline with llama3-style scaled high frequencies (theta, read at index 1, unchanged)."""
    model = onnx.load(str(llama), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name.endswith("inv_freq"))
    inv = numpy_helper.to_array(t).copy()
    inv[3:] /= 8.0
    t.CopyFrom(numpy_helper.from_array(inv, t.name))
    dst.mkdir()
    onnx.save(model, str(dst / "model.onnx"))
    shutil.copy(llama.parent / "model.onnx.data", dst / "model.onnx.data")
    shutil.copy(llama.parent / "config.json", dst / "config.json")  # no tokenizer: a second warning
    return dst / "model.onnx"


def test_warnings_shown_by_default_hidden_by_quiet(llama, tmp_path, capsys):
    src = _scaled_rope_copy(llama, tmp_path / "in")
    code, _, err = run_cli(capsys, src, tmp_path / "a")
    assert code == 0, err
    assert "WARNING: head size 16 has no edgellm-0.9 prefill kernel" in err  # scaled RoPE is baked, not warned
    assert "WARNING: no tokenizer found" in err and "--tokenizer" in err
    code, out, err = run_cli(capsys, src, tmp_path / "b", "-q")
    assert code == 0 and err == "" and "rewrote 2/2" in out
    # -v keeps the warnings (this rewrite logs nothing at INFO); -vv adds the steps at DEBUG
    code, _, err = run_cli(capsys, src, tmp_path / "c", "-vv")
    assert code == 0, err
    assert "WARNING: no tokenizer" in err and "DEBUG: step load" in err and "DEBUG: step match" in err
