"""Fixtures of the vision-encoder tests: one plain export per family (module scope), rewritten for
edgellm-0.11 (export_visual, keeping the plain export) and edgellm-0.9 (export_visual from that plain
export); two synthetic images. Each test file defines the `family` fixture."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import transformers

from onnx_rewriter.hf import tiny_vlm
from onnx_rewriter.vision import export_visual

TARGETS = ("edgellm-0.11", "edgellm-0.9")


@pytest.fixture(scope="module")
def vlm(models, family):
    ckpt = models.vlm_checkpoint(family)
    model = getattr(transformers, tiny_vlm.FAMILIES[family]["model"]).from_pretrained(ckpt).eval()
    return SimpleNamespace(ckpt=ckpt, model=model)


@pytest.fixture(scope="module")
def exported(vlm, tmp_path_factory):
    root = tmp_path_factory.mktemp("visual")
    plain = root / "plain.onnx"
    out = {}
    for target in TARGETS:
        folder = root / target
        report = export_visual(vlm.model, folder, target=target, checkpoint=vlm.ckpt,
                               **({"keep_plain": plain} if target == TARGETS[0] else {"plain": plain}))
        out[target] = SimpleNamespace(folder=folder, visual=folder / "visual", report=report, plain=plain)
    return out


@pytest.fixture(scope="module")
def images():
    return tiny_vlm.synthetic_images()
