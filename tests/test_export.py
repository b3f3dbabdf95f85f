"""`make export` / `python -m onnx_rewriter export` from a local checkpoint folder, and the Python API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import onnx_rewriter

REPO = Path(__file__).resolve().parents[1]
FILES = {"model.onnx", "embedding.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "processed_chat_template.json"}


def test_make_export_writes_the_contract_files(models, tmp_path):
    ckpt = models.checkpoint("llama")
    out = tmp_path / "out"
    env = dict(os.environ, PY=sys.executable)
    proc = subprocess.run(["make", "-s", "-C", str(REPO), "export", f"MODEL={ckpt}", f"OUT={out}",
                           f"PY={sys.executable}", "VERIFY=1"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == FILES | {".onnx_rewriter.json"}  # + the manifest (safety.py)
    assert "verify PASSED" in proc.stdout
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert leftovers == []


def test_python_api_export_and_verify(models, tmp_path):
    ckpt = models.checkpoint("qwen2")
    run = onnx_rewriter.export(model=str(ckpt), output_dir=tmp_path / "out", target="edgellm-0.9", dtype="float32")
    assert set(run.files) == FILES
    assert all(l.rewritten for l in run.report.layers)
    assert onnx_rewriter.verify(tmp_path / "out", model=str(ckpt), steps=2, quiet=True).passed


def test_rewrite_api_returns_files_and_report(models, tmp_path):
    run = onnx_rewriter.rewrite(models.baseline("llama"), tmp_path / "o", dtype="float16")
    assert "model.onnx" in run.files and run.spec["num_hidden_layers"] == 2
    assert len(run.report.layers) == 2


@pytest.mark.parametrize("missing", ["some-org/not-a-model"])
def test_export_of_unreachable_hub_id_fails_fast(tmp_path, missing):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "onnx_rewriter", "export", "--model", missing, "--output_dir",
                           str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "local" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
