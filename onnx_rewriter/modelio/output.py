"""Atomic output: everything is written into a temporary folder beside the target, renamed at the end.

An interrupted run (exception, Ctrl-C, kill) leaves the previous state of the output folder untouched.
Temporary names carry the writer's pid (`.NAME.tmp-PID-xxxx`, `.NAME.old-PID`): a SIGKILLed run cannot
clean up after itself, so the next run removes the siblings whose writer is gone (and puts a previous
folder back if the kill came between the two renames).
What may be replaced at all (only a folder this tool wrote, never one overlapping the input) is
safety.py's rule; the folder is marked with its manifest when it is complete.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from .. import safety
from ..errors import RewriteError

log = logging.getLogger(__name__)


class OutputDir:
    def __init__(self, path: Path, force: bool = False):
        self.path = safety.resolved(path)  # a symlinked output: its target is replaced, the link stays
        self.force = force
        self.tmp: Path | None = None

    @staticmethod
    def precheck(path: Path, force: bool, what: str = "output folder") -> None:
        """Fail before any work when the folder cannot be (re)placed. Creates nothing (safety.py's rule)."""
        safety.precheck_folder(path, force, what)

    def _clean_stale(self, parent: Path) -> None:
        """Remove temp siblings left by killed runs; restore a folder a kill left renamed aside."""
        pat = re.compile(rf"^\.{re.escape(self.path.name)}\.(tmp|old)-(\d+)(-.*)?$")
        for sib in sorted(parent.iterdir()):
            m = pat.match(sib.name)
            if not m or safety.pid_alive(int(m.group(2))):
                continue
            if m.group(1) == "old" and not self.path.exists():
                log.warning("restoring '%s' from an interrupted run's '%s'", self.path, sib.name)
                os.rename(sib, self.path)
                continue
            log.info("removing '%s' left by an interrupted run", sib)
            shutil.rmtree(sib, ignore_errors=True)

    def __enter__(self) -> Path:
        self.precheck(self.path, self.force)
        parent = self.path.absolute().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RewriteError(f"cannot create the output folder's parent '{parent}': {exc.strerror}") from None
        self._clean_stale(parent)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-{os.getpid()}-", dir=parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            err = safety.user_os_error(exc, f"cannot write the output folder '{self.path}'",
                                       "free some space or choose another output folder")
            if err is not None:
                raise err from None
            return False
        try:
            safety.write_manifest(self.tmp)
            os.chmod(self.tmp, 0o755)
            for f in self.tmp.iterdir():
                os.chmod(f, 0o755 if f.is_dir() else 0o644)  # an EAGLE3 export's base/ and draft/ are folders
            self._replace()
        except BaseException as exc:
            shutil.rmtree(self.tmp, ignore_errors=True)
            err = safety.user_os_error(exc, f"cannot write the output folder '{self.path}'",
                                       "free some space or choose another output folder")
            if err is not None:
                raise err from None
            raise
        return False

    def _replace(self) -> None:
        cwd_inside = _cwd_within(self.path)  # `OUT` is `.`: the process would be left in a deleted folder
        # Again now: another run may have written the folder since our precheck (two runs, one new folder).
        if self.path.exists() and any(self.path.iterdir()):
            try:
                safety.check_replaceable(self.path, self.force)
            except RewriteError as exc:
                raise RewriteError(f"{exc} (another run wrote it while this one worked)") from None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.rename(self.path, old)
            try:
                os.rename(self.tmp, self.path)
            except BaseException:
                os.rename(old, self.path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.path)
        if cwd_inside:
            os.chdir(self.path)


def _cwd_within(path: Path) -> bool:
    try:
        cwd = Path.cwd()
    except OSError:
        return False
    return cwd == path or path in cwd.parents
