"""Atomic output: a failed or killed run leaves the previous folder as it was and no temporary folders;
the same input and options give byte-identical files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onnx_rewriter import cli
from onnx_rewriter.errors import RewriteError
from onnx_rewriter.modelio.output import OutputDir
from onnx_rewriter.pipeline import steps as pipeline

from .support.processes import signal_mid_write, start_mid_write


@pytest.fixture(scope="module")
def llama(models):
    return models.baseline("llama")


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture
def previous(llama, tmp_path):
    """An output folder from an earlier run (fp32, so a later fp16 run would change every byte)."""
    out = tmp_path / "out"
    pipeline.rewrite(llama, out, dtype="float32")
    return out, snapshot(out)


def test_exception_mid_write_keeps_previous(llama, previous, monkeypatch, capsys):
    from onnx_rewriter.sidefiles import writer

    out, before = previous

    def fail(run, tmp):
        assert (tmp / "model.onnx").is_file()  # really mid-write: the graph is already there
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "write_side_files", fail)
    with pytest.raises(RewriteError, match="No space left on device; free some space"):
        pipeline.rewrite(llama, out, force=True)
    assert snapshot(out) == before and siblings(out) == []
    # Through the CLI a full disk is the user's to fix: one line naming the folder, exit 2.
    assert cli.main([str(llama), str(out), "--force"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot write the output folder '{out.resolve()}': No space left on device; free some space "
        f"or choose another output folder")
    assert snapshot(out) == before and siblings(out) == []


def test_refusal_mid_pipeline_keeps_previous(llama, previous, monkeypatch):
    out, before = previous

    def refuse(run):
        raise RewriteError("refused on purpose")

    monkeypatch.setattr(pipeline, "STEPS", pipeline.STEPS[:-1] + [refuse])
    with pytest.raises(RewriteError):
        pipeline.rewrite(llama, out, force=True)
    assert snapshot(out) == before and siblings(out) == []


def _kill_mid_write(tmp_path, argv) -> None:
    proc, flag = start_mid_write(tmp_path, argv)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the child never reached the write step"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def test_sigkill_mid_write_keeps_previous_and_next_run_cleans_up(llama, previous, tmp_path):
    out, before = previous
    _kill_mid_write(tmp_path, [llama, out, "--force", "-q"])
    assert snapshot(out) == before  # the killed run replaced nothing
    left = siblings(out)
    assert len(left) == 1 and left[0].startswith(".out.tmp-")  # SIGKILL leaves its temp folder ...
    pipeline.rewrite(llama, out, force=True)  # ... which the next run removes
    assert siblings(out) == []
    assert snapshot(out) != before


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_kill_between_renames_restores_previous(llama, previous):
    """Killed after moving the old folder aside but before moving the new one in: the next run puts the
    old folder back first (and then replaces it normally)."""
    out, before = previous
    aside = out.with_name(f".out.old-{_dead_pid()}")
    os.rename(out, aside)
    with OutputDir(out, force=True) as tmp:
        assert snapshot(out) == before  # restored before anything else happens
        (tmp / "new.txt").write_text("new")
    manifest = b'{\n "written_by": "onnx_rewriter",\n "files": [\n  "new.txt"\n ]\n}\n'
    assert snapshot(out) == {".onnx_rewriter.json": manifest,
                             "new.txt": b"new"} and siblings(out) == []


def test_live_writers_temp_folder_is_left_alone(tmp_path):
    out = tmp_path / "out"
    live = tmp_path / f".out.tmp-{os.getppid()}-abc"  # the pytest runner's parent: alive
    live.mkdir()
    with OutputDir(out) as tmp:
        (tmp / "a").write_text("a")
    assert live.is_dir() and (out / "a").is_file()


def test_sigterm_unwinds_and_removes_temp(llama, previous, tmp_path):
    out, before = previous
    proc, flag = start_mid_write(tmp_path, [llama, out, "--force"])
    _, err = signal_mid_write(proc, flag, signal.SIGTERM)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: interrupted")
    assert snapshot(out) == before and siblings(out) == []


def test_same_input_same_bytes(llama, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pipeline.rewrite(llama, a)
    pipeline.rewrite(llama, b)
    sa, sb = snapshot(a), snapshot(b)
    assert sorted(sa) == sorted(sb)
    different = [name for name in sa if sa[name] != sb[name]]
    assert not different, f"files differ between two identical runs: {different}"


def test_same_input_same_bytes_external_data(llama, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pipeline.rewrite(llama, a, external_data=True)
    pipeline.rewrite(llama, b, external_data=True)
    assert "model.onnx.data" in snapshot(a)
    assert snapshot(a) == snapshot(b)
