"""Shared fixtures: tiny checkpoints and their baseline exports, built once per test session.

Exports are the slow part (dynamo: ~8 s for a tiny model on 2 cores), so every test that needs the
baseline of (family, flavour) asks `baseline(...)` and gets the cached file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class Models:
    """Builds and caches checkpoints and baseline exports under one session folder."""

    def __init__(self, root: Path):
        self.root = root
        self._done: dict = {}

    def checkpoint(self, family: str, dtype: str = "float32", **overrides) -> Path:
        from onnx_rewriter import tiny

        key = ("ckpt", family, dtype, tuple(sorted(overrides.items())))
        if key not in self._done:
            name = "_".join([family, dtype] + [f"{k}-{v}" for k, v in sorted(overrides.items())])
            self._done[key] = tiny.build_checkpoint(family, self.root / "ckpt" / name, dtype=dtype, **overrides)
        return self._done[key]

    def baseline(self, family: str, dtype: str = "float32", exporter: str = "dynamo", opset: int | None = None,
                 attn: str = "sdpa", native_dtype: bool = False, kv_cache: bool = False, refs: bool = False,
                 **overrides) -> Path:
        """A plain export (no KV cache) of the family's tiny checkpoint; config and tokenizer beside it.

        native_dtype: export in the checkpoint's own dtype (a bf16 / fp16 graph) instead of fp32.
        kv_cache: an Optimum-style export with past_key_values inputs and present outputs (tests/kv_export.py).
        refs: `make export`'s baseline: weights referenced in the checkpoint, weight transposes left unfolded.
        """
        import shutil

        from onnx_rewriter import checkpoint_refs
        from onnx_rewriter.export import export_baseline, load_model

        key = ("onnx", family, dtype, exporter, opset, attn, native_dtype, kv_cache, refs,
               tuple(sorted(overrides.items())))
        if key not in self._done:
            ckpt = self.checkpoint(family, dtype, **overrides)
            flags = (["native"] if native_dtype else []) + (["kv"] if kv_cache else []) + (["refs"] if refs else [])
            name = "_".join([family, dtype, exporter, str(opset), attn] + flags
                            + [f"{k}-{v}" for k, v in sorted(overrides.items())])
            out = self.root / "onnx" / name
            out.mkdir(parents=True, exist_ok=True)
            model, config = load_model(str(ckpt), attn_implementation=attn,
                                       torch_dtype="auto" if native_dtype else "float32")
            if kv_cache:
                from tests.kv_export import export_with_cache

                export_with_cache(model, config, out / "model.onnx", exporter=exporter)
            else:
                files = checkpoint_refs.checkpoint_files(str(ckpt)) if refs else ()
                export_baseline(model, out / "model.onnx", exporter=exporter, opset=opset, checkpoint=files)
            for f in ckpt.iterdir():
                if f.suffix in (".json", ".jinja") and f.name != "generation_config.json":
                    shutil.copy(f, out / f.name)
            self._done[key] = out / "model.onnx"
        return self._done[key]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    return Models(tmp_path_factory.mktemp("models"))
