"""What may be written where, decided before any work, for every command and the API.

Two rules keep a user's files safe:
- an output folder never is, contains or lies inside the checkpoint an export reads, nor is or contains
  anything else we read (the input model's folder, config, tokenizer): `--force` changes nothing here
  (`rewrite model.onnx out` beside the model is the common case and destroys nothing, so it stays allowed);
- `--force` only replaces a folder this tool wrote, recognised by its manifest (MANIFEST, listing every
  file written); a folder holding anything else is never deleted.
Paths are compared after resolving symlinks, `.` and `..`, so every spelling of a folder is the same folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

from .errors import RewriteError

MANIFEST = ".onnx_rewriter.json"
# OS errors a user fixes (space, permissions, a read-only mount), as opposed to bugs.
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def resolved(path) -> Path:
    """The real absolute path (symlinks followed, `.`/`..` gone); a missing tail is kept as spelled."""
    return Path(path).expanduser().resolve()


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_no_overlap(out, folders: dict | None = None, files: dict | None = None, what: str = "output folder"):
    """Refuse an output folder `out` that is, contains or lies inside one of `folders` ({label: path}),
    or is or contains one of `files` ({label: path}). Labels say what the path is ("the checkpoint")."""
    out = resolved(out)
    for label, p in (folders or {}).items():
        p = resolved(p)
        if _within(out, p) or _within(p, out):
            how = "is" if out == p else "lies inside" if _within(out, p) else "contains"
            raise RewriteError(f"{what} '{out}' {how} {label} '{p}'; writing there could destroy it: "
                               f"choose an output folder outside it")
    for label, p in (files or {}).items():
        p = resolved(p)
        if _within(p, out):
            raise RewriteError(f"{what} '{out}' {'is' if p == out else 'contains'} {label} '{p}'; writing "
                               f"there could destroy it: choose another output folder")


def foreign_files(folder: Path) -> list[str]:
    """Names in `folder` this tool did not write (all of them when it has no readable manifest)."""
    names = sorted(p.name for p in folder.iterdir())
    try:
        ours = set(json.loads((folder / MANIFEST).read_text())["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        return names
    return [n for n in names if n not in ours]


def check_replaceable(path: Path, force: bool, what: str = "output folder") -> None:
    """An existing non-empty folder is replaced only with --force, and only when this tool wrote it."""
    if not path.is_dir() or not any(path.iterdir()):
        return
    foreign = foreign_files(path)
    if foreign:
        shown = ", ".join(f"'{n}'" for n in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RewriteError(f"{what} '{path}' exists and holds files onnx_rewriter did not write ({shown}); it is "
                           f"never replaced, even with --force: choose another folder or empty it yourself")
    if not force:
        raise RewriteError(f"{what} '{path}' holds an earlier onnx_rewriter output; pass --force to replace it "
                           f"or choose another folder")


def write_manifest(folder: Path) -> None:
    names = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    (folder / MANIFEST).write_text(json.dumps({"written_by": "onnx_rewriter", "files": names}, indent=1) + "\n")


def user_os_error(exc: OSError, doing: str, fix: str) -> RewriteError | None:
    """A RewriteError for an OS error the user can fix (disk full, read-only, no permission), else None."""
    if not isinstance(exc, OSError) or exc.errno not in USER_ERRNOS:
        return None
    name = f" '{exc.filename}'" if exc.filename else ""
    return RewriteError(f"{doing}{name}: {exc.strerror or os.strerror(exc.errno)}; {fix}")


@contextlib.contextmanager
def os_errors(doing: str, fix: str):
    """Turn a user-fixable OSError inside the block into a one-line RewriteError (exit 2)."""
    try:
        yield
    except OSError as exc:
        err = user_os_error(exc, doing, fix)
        if err is None:
            raise
        raise err from None


def check_writable_file(path, option: str) -> None:
    """A file option (--report) that will be written at the end: fail now, not after the work."""
    p = resolved(path)
    if p.is_dir():
        raise RewriteError(f"{option} '{path}' is a folder; give a file path")
    if p.exists():
        try:  # appending nothing changes nothing, and fails where writing would
            open(p, "a").close()
            ok = True
        except OSError:
            ok = False
    else:
        parent = p.parent
        ok = parent.is_dir()
        if ok:
            try:  # os.access says yes to root even on read-only mounts: really try
                fd = os.open(parent / f".{p.name}.probe-{os.getpid()}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.close(fd)
                os.unlink(parent / f".{p.name}.probe-{os.getpid()}")
            except OSError:
                ok = False
    if not ok:
        raise RewriteError(f"cannot write {option} '{path}' (missing or read-only folder); choose another path")
