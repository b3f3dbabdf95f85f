"""Fixtures shared by the target tests: rewrites done once per session, and q/k-norm models whose
gammas are far from one (N(1, 0.5); the tiny checkpoints' are N(1, 0.2), see hf/tiny.perturb), so a dropped
or swapped gamma changes the logits well beyond the fp16 criterion."""

from __future__ import annotations

import shutil

import pytest

from onnx_rewriter.pipeline import steps as pipeline

NORM_FAMILIES = ("qwen3", "gemma3")


@pytest.fixture(scope="session")
def random_norms(models, tmp_path_factory):
    """random_norms(family) -> (checkpoint, baseline) with distinct random q/k norm weights per layer."""
    done = {}

    def get(family):
        if family in done:
            return done[family]
        import torch

        from onnx_rewriter.hf.export import export_baseline, load_model

        root = tmp_path_factory.mktemp(f"{family}_norms")
        ckpt = root / "ckpt"
        shutil.copytree(models.checkpoint(family), ckpt)
        model, _ = load_model(str(ckpt))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    # Qwen3 multiplies by w, Gemma3 by 1 + w: both end up well away from 1.
                    base = 1.0 if family == "qwen3" else 0.0
                    norm.weight.copy_(base + 0.5 * torch.randn(norm.weight.shape, generator=gen))
        model.save_pretrained(ckpt)
        base_dir = root / "onnx"
        base_dir.mkdir()
        export_baseline(model, base_dir / "model.onnx")
        models.copy_side_files(ckpt, base_dir)
        done[family] = (ckpt, base_dir / "model.onnx")
        return done[family]

    return get


@pytest.fixture(scope="session")
def rewritten(models, random_norms, tmp_path_factory):
    """rewritten(family, target, dtype) -> (output folder, checkpoint), each rewrite done once."""
    root, done = tmp_path_factory.mktemp("targets"), {}

    def get(family, target, dtype):
        key = (family, target, dtype)
        if key not in done:
            if family in NORM_FAMILIES:
                ckpt, base = random_norms(family)
            else:
                ckpt, base = models.checkpoint(family), models.baseline(family)
            out = root / "_".join(key)
            pipeline.rewrite(base, out, target=target, dtype=dtype)
            done[key] = (out, ckpt)
        return done[key]

    return get
