"""Child processes for the interruption tests: wait until the child says it is mid-write, then signal it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The command line in a child whose model save stops right after writing: it writes the output path to
# the flag file (argv[1]) and sleeps, so the parent can signal it mid-write.
MID_WRITE_CHILD = """
import sys, time
from onnx_rewriter import cli
from onnx_rewriter.modelio import graph
save = graph.save
def slow_save(model, out_path, *a, **k):
    files = save(model, out_path, *a, **k)
    open(sys.argv[1], "w").write(str(out_path))
    time.sleep(600)
    return files
graph.save = slow_save
sys.exit(cli.main(sys.argv[2:]))
"""


def start_mid_write(tmp_path: Path, argv, **popen) -> tuple[subprocess.Popen, Path]:
    """Starts `onnx_rewriter argv` in a child that stops mid-write; returns (the process, its flag file).
    stderr is a pipe of text."""
    flag, script = tmp_path / "mid-write", tmp_path / "child.py"
    script.write_text(MID_WRITE_CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(flag), *map(str, argv)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **popen)
    return proc, flag


def default_sigint() -> None:
    """preexec_fn for a child that must see Ctrl-C: a shell's background job (`cmd &`, nohup) starts with
    SIGINT ignored, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_mid_write(proc: subprocess.Popen, flag: Path, sig: int = signal.SIGINT, wait_s: float = 120):
    """Sends `sig` once `flag` exists (the child writes it at its write step); returns (returncode, stderr)."""
    deadline = time.monotonic() + wait_s
    while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.exists(), "the child never reached the write step"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err
