"""Shared fixtures: tiny checkpoints and their baseline exports, built once per test session.

Exports are the slow part (dynamo: ~8 s for a tiny model on 2 cores), so every test that needs the
baseline of (family, flavour) asks `baseline(...)` and gets the cached file. ONNX_REWRITER_TEST_MODELS=DIR
keeps them across sessions (tests/mutants.py runs the suite once per mutant; the exports do not change).
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# huggingface_hub reads that switch once, when first imported: first imported inside a test that unsets it
# (test_errors.py's no-network case, run first), the rest of the session would be online. Read it now (~15 ms).
with contextlib.suppress(ImportError):
    import huggingface_hub.constants  # noqa: F401
# torch's inductor picks its cache folder under tempfile.gettempdir() on first use and pins it in this variable:
# first used inside a test that points tempfile at a small tmpfs (test_safety.py), it lands there, and every
# later test in the session would use the unmounted folder. torch's own default, fixed before any test runs.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, config):
    # pytest-randomly shuffles the order and names its seed in the header, which `make test` (-q) hides.
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and getattr(config.option, "randomly_reorganize", False):
        terminalreporter.write_line(f"test order shuffled with --randomly-seed={seed} "
                                    f"(the same order again: make test ARGS=--randomly-seed={seed})")


# What sys.stderr is outside any test: pytest's session-wide capture (conftest loads after it starts), or the
# terminal under -s. A library handler made outside a test writes there.
_SESSION_STDERR = sys.stderr


def _repoint_closed_log_handlers():
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            if not isinstance(handler, logging.StreamHandler):
                continue
            # transformers also binds the handler's flush to that stream's own (handler.flush = sys.stderr.flush)
            own_flush = handler.__dict__.get("flush")
            flushes = getattr(own_flush, "__self__", None)
            if getattr(handler.stream, "closed", False) or getattr(flushes, "closed", False):
                handler.stream = _SESSION_STDERR
                if own_flush is not None:
                    handler.flush = _SESSION_STDERR.flush


@pytest.fixture(autouse=True)
def _no_log_handler_left_on_a_closed_stream():
    """transformers, huggingface_hub and torch make their stderr handlers on their first log call, bound to the
    sys.stderr of that moment: inside a test using capsys that is a capture stream, closed after the test, and
    every later log line in the session prints '--- Logging error ---' into whatever the next test captures.
    Such a handler is pointed at the stream it would have been made with outside any test (before each test,
    and after it, once the capture is closed)."""
    _repoint_closed_log_handlers()
    yield
    _repoint_closed_log_handlers()


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
        kv_cache: an Optimum-style export with past_key_values inputs and present outputs (tests/support/kv_export.py).
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
                from tests.support.kv_export import export_with_cache

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


# Private copies of the tiny llama's baseline folder and checkpoint, for tests that point outputs at them
# or damage them (test_trust*.py); a test file may define its own.
@pytest.fixture
def base(models, tmp_path):
    dst = tmp_path / "base"
    shutil.copytree(models.baseline("llama").parent, dst)
    return dst / "model.onnx"


@pytest.fixture
def ckpt(models, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(models.checkpoint("llama"), dst)
    return dst


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """$TMPDIR of this test alone: whatever temporary folder a run made (or left) shows here."""
    tmp = tmp_path / "TMPDIR"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp
