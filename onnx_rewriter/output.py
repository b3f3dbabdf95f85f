"""Atomic output: everything is written into a temporary folder beside the target, renamed at the end.

An interrupted run (exception, Ctrl-C, kill) leaves the previous state of the output folder untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import RewriteError


class OutputDir:
    def __init__(self, path: Path, force: bool = False):
        self.path = Path(path)
        self.force = force
        self.tmp: Path | None = None

    @staticmethod
    def precheck(path: Path, force: bool) -> None:
        """Fail before any work when the folder cannot be (re)placed."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RewriteError(f"output '{path}' exists and is not a folder; choose another output path")
        if path.is_dir() and any(path.iterdir()) and not force:
            raise RewriteError(f"output folder '{path}' exists and is not empty; pass --force to replace it")
        parent = path.resolve().parent
        if not parent.exists():
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RewriteError(f"cannot create the output folder's parent '{parent}': {exc.strerror}") from None
        if not os.access(parent, os.W_OK):
            raise RewriteError(f"cannot write into '{parent}' (permission denied); choose another output folder")

    def __enter__(self) -> Path:
        self.precheck(self.path, self.force)
        parent = self.path.resolve().parent
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        os.chmod(self.tmp, 0o755)
        for f in self.tmp.iterdir():
            os.chmod(f, 0o644)
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.rename(self.path, old)
            os.rename(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.path)
        return False
