"""Child processes for the interruption tests: wait until the child says it is mid-write, then signal it."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


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
