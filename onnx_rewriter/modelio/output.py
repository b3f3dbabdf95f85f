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


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


# what a temporary name adds to the folder's own: `.NAME.tmp-PID-` plus mkdtemp's 8 characters
_TMP_NAME_EXTRA = 32


def _check_name_lengths(path: Path, what: str) -> None:
    """Every name of the path, and the temporary sibling of the last, fit the file system (NAME_MAX)."""
    try:
        limit = os.pathconf(path.anchor or "/", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for i, part in enumerate(path.parts[1:]):
        extra = _TMP_NAME_EXTRA if i == len(path.parts) - 2 else 0
        if len(os.fsencode(part)) + extra > limit:
            raise RewriteError(f"the {what} name '{part[:40]}...' is {len(os.fsencode(part))} bytes long; the file "
                               f"system allows {limit - extra} for it: choose a shorter name")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class OutputDir:
    def __init__(self, path: Path, force: bool = False):
        self.path = safety.resolved(path)  # a symlinked output: its target is replaced, the link stays
        self.force = force
        self.tmp: Path | None = None

    @staticmethod
    def precheck(path: Path, force: bool, what: str = "output folder") -> None:
        """Fail before any work when the folder cannot be (re)placed. Creates nothing."""
        path = safety.resolved(path)
        _check_name_lengths(path, what)  # first: exists() raises on a name too long
        if path.exists() and not path.is_dir():
            raise RewriteError(f"output '{path}' exists and is not a folder; choose another output path")
        if path.parent == path:
            raise RewriteError(f"the {what} cannot be the root folder '{path}'; choose a folder of its own")
        safety.check_replaceable(path, force, what)
        base = _nearest_existing(path.parent)
        if not base.is_dir():
            raise RewriteError(f"cannot create the output folder: '{base}' is a file, not a folder; "
                               f"choose another output folder")
        # os.access says yes to root even on read-only mounts: really try to create something.
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".onnx_rewriter-probe-", dir=base))
        except OSError as exc:
            raise RewriteError(f"cannot write into '{base}' ({exc.strerror or exc}); choose another output "
                               f"folder") from None

    def _clean_stale(self, parent: Path) -> None:
        """Remove temp siblings left by killed runs; restore a folder a kill left renamed aside."""
        pat = re.compile(rf"^\.{re.escape(self.path.name)}\.(tmp|old)-(\d+)(-.*)?$")
        for sib in sorted(parent.iterdir()):
            m = pat.match(sib.name)
            if not m or _pid_alive(int(m.group(2))):
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
                os.chmod(f, 0o644)
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
