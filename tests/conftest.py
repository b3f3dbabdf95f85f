"""Shared fixtures: tiny checkpoints and their baseline exports, built once per test session.

Exports are the slow part (dynamo: ~8 s for a tiny model on 2 cores), so every test that needs the
baseline of (family, flavour) asks `baseline(...)` and gets the cached file. ONNX_REWRITER_TEST_MODELS=DIR
keeps them across sessions (tests/mutants.py runs the suite once per mutant; the exports do not change).
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


DONE = ".complete"  # marker beside a folder, written last: one without it (interrupted) is built again


class Models:
    """Builds and caches checkpoints and baseline exports under one session folder."""

    def __init__(self, root: Path):
        self.root = root
        self._done: dict = {}

    def checkpoint(self, family: str, dtype: str = "float32", **overrides) -> Path:
        from onnx_rewriter.hf import tiny

        key = ("ckpt", family, dtype, tuple(sorted(overrides.items())))
        if key not in self._done:
            name = "_".join([family, dtype] + [f"{k}-{v}" for k, v in sorted(overrides.items())])
            path = self.root / "ckpt" / name
            if path.with_name(name + DONE).is_file():
                self._done[key] = path
            else:
                self._done[key] = tiny.build_checkpoint(family, path, dtype=dtype, **overrides)
                path.with_name(name + DONE).touch()
        return self._done[key]

    def vlm_checkpoint(self, family: str, dtype: str = "float32") -> Path:
        """A tiny random Qwen2.5-VL / Qwen3-VL checkpoint (onnx_rewriter.hf.tiny_vlm), built once."""
        from onnx_rewriter.hf import tiny_vlm

        key = ("vlm", family, dtype)
        if key not in self._done:
            name = f"{family}_{dtype}"
            path = self.root / "vlm" / name
            if not path.with_name(name + DONE).is_file():
                tiny_vlm.build_vlm_checkpoint(family, path, dtype=dtype)
                path.with_name(name + DONE).touch()
            self._done[key] = path
        return self._done[key]

    def vlm_baseline(self, family: str) -> Path:
        """The plain export of a tiny VLM's text decoder (hf/vlm.py), VLM config.json beside it."""
        from onnx_rewriter.hf.vlm import export_text_baseline, load_vlm

        key = ("vlm-onnx", family)
        if key not in self._done:
            ckpt = self.vlm_checkpoint(family)
            out = self.root / "vlm-onnx" / family
            if not out.with_name(family + DONE).is_file():
                out.mkdir(parents=True, exist_ok=True)
                export_text_baseline(*load_vlm(str(ckpt)), out / "model.onnx")
                out.with_name(family + DONE).touch()
            self._done[key] = out / "model.onnx"
        return self._done[key]

    @staticmethod
    def copy_side_files(ckpt: Path, dst: Path) -> None:
        """config.json, tokenizer and chat template beside a baseline, as `make export` leaves them."""
        import shutil

        for f in ckpt.iterdir():
            if f.suffix in (".json", ".jinja") and f.name != "generation_config.json":
                shutil.copy(f, dst / f.name)

    def baseline(self, family: str, dtype: str = "float32", exporter: str = "dynamo", opset: int | None = None,
                 attn: str = "sdpa", native_dtype: bool = False, kv_cache: bool = False, refs: bool = False,
                 **overrides) -> Path:
        """A plain export (no KV cache) of the family's tiny checkpoint; config and tokenizer beside it.

        native_dtype: export in the checkpoint's own dtype (a bf16 / fp16 graph) instead of fp32.
        kv_cache: an Optimum-style export with past_key_values inputs and present outputs (tests/kv_export.py).
        refs: `make export`'s baseline: weights referenced in the checkpoint, weight transposes left unfolded.
        """
        from onnx_rewriter.hf import checkpoint_refs
        from onnx_rewriter.hf.export import export_baseline, load_model

        key = ("onnx", family, dtype, exporter, opset, attn, native_dtype, kv_cache, refs,
               tuple(sorted(overrides.items())))
        if key not in self._done:
            ckpt = self.checkpoint(family, dtype, **overrides)
            flags = (["native"] if native_dtype else []) + (["kv"] if kv_cache else []) + (["refs"] if refs else [])
            name = "_".join([family, dtype, exporter, str(opset), attn] + flags
                            + [f"{k}-{v}" for k, v in sorted(overrides.items())])
            out = self.root / "onnx" / name
            if out.with_name(name + DONE).is_file():
                self._done[key] = out / "model.onnx"
                return self._done[key]
            out.mkdir(parents=True, exist_ok=True)
            model, config = load_model(str(ckpt), attn_implementation=attn,
                                       torch_dtype="auto" if native_dtype else "float32")
            if kv_cache:
                from tests.kv_export import export_with_cache

                export_with_cache(model, config, out / "model.onnx", exporter=exporter)
            else:
                files = checkpoint_refs.checkpoint_files(str(ckpt)) if refs else ()
                export_baseline(model, out / "model.onnx", exporter=exporter, opset=opset, checkpoint=files)
            self.copy_side_files(ckpt, out)
            out.with_name(name + DONE).touch()
            self._done[key] = out / "model.onnx"
        return self._done[key]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    keep = os.environ.get("ONNX_REWRITER_TEST_MODELS")
    return Models(Path(keep) if keep else tmp_path_factory.mktemp("models"))
