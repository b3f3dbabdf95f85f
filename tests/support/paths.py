"""What the written-path tests share: this tool's temporary folders, and a guard that no work ran."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnx_rewriter.hf import export as export_mod
from onnx_rewriter.hf import vlm as vlm_mod
from onnx_rewriter.pipeline import steps as pipeline


def ours(tmp: Path) -> list[str]:
    """This tool's temporary folders in $TMPDIR (other programs may keep files of their own there)."""
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("onnx_rewriter"))


def no_work(monkeypatch):
    """Fail the test if the rewrite runs or a model loads: a refusal must come before any work."""
    monkeypatch.setattr(pipeline, "STEPS", [lambda run: pytest.fail("the rewrite ran")])
    monkeypatch.setattr(export_mod, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(vlm_mod, "load_vlm", lambda *a, **k: pytest.fail("loaded the VLM"))
