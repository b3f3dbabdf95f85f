"""What may be written where, decided before any work, for every command and the API.

Every path a route writes goes through `check_writes` before the route reads anything heavy: the output
folder, `--keep-baseline`, `--report`; temporary folders come from `temp_folder` (removed on any exit, and
a killed run's are removed by the next). Three rules keep a user's files safe:
- an output folder never is, contains or lies inside the checkpoint an export reads, nor is or contains
  anything else we read (the input model's folder, config, tokenizer): `--force` changes nothing here
  (`rewrite model.onnx out` beside the model is the common case and destroys nothing, so it stays allowed);
- `--force` only replaces a folder this tool wrote, recognised by its manifest (MANIFEST, listing every
  file written); a folder holding anything else is never deleted.
- a file option (`--report`) never names something we read, lies inside a folder we read from or write,
  and replaces an existing file only when it is an earlier report of this tool.
Paths are compared after resolving symlinks, `.` and `..`, so every spelling of a folder is the same folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
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
            fix = "an output folder" if what == "output folder" else f"a {what}"
            raise RewriteError(f"{what} '{out}' {how} {label} '{p}'; writing there could destroy it: "
                               f"choose {fix} outside it")
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


def precheck_folder(path, force: bool, what: str = "output folder") -> None:
    """Fail before any work when the folder cannot be (re)placed. Creates nothing."""
    path = resolved(path)
    _check_name_lengths(path, what)
    if path.exists() and not path.is_dir():
        raise RewriteError(f"{what} '{path}' exists and is not a folder; choose another path")
    if path.parent == path:
        raise RewriteError(f"the {what} cannot be the root folder '{path}'; choose a folder of its own")
    check_replaceable(path, force, what)
    base = path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise RewriteError(f"cannot create the {what}: '{base}' is a file, not a folder; choose another path")
    # os.access says yes to root even on read-only mounts: really try to create something.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".onnx_rewriter-probe-", dir=base))
    except OSError as exc:
        raise RewriteError(f"cannot write into '{base}' ({exc.strerror or exc}); choose another {what}") from None


def is_our_report(path: Path) -> bool:
    """An earlier `--report` of this tool (JSON with its layers and status), which may be replaced."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(d, dict) and "layers" in d and d.get("status") in ("rewritten", "refused")


def check_report_path(report, folders: dict, files: dict, option: str = "--report") -> None:
    """`--report FILE`: not a path we read (`files`), not inside a folder we read or write (`folders`), an
    existing file only when it is our earlier report; and writable, all before any work."""
    p = resolved(report)
    for label, f in files.items():
        if p == resolved(f):
            raise RewriteError(f"{option} '{report}' is {label}; writing the report there would destroy it: "
                               f"choose another file")
    for label, d in folders.items():
        d = resolved(d)
        if _within(p, d):
            raise RewriteError(f"{option} '{report}' {'is' if p == d else 'lies inside'} {label} '{d}'; "
                               f"choose a file outside it")
    if p.is_file() and not is_our_report(p):
        raise RewriteError(f"{option} '{report}' exists and is not a report onnx_rewriter wrote; it is never "
                           f"replaced: choose another file or remove it yourself")
    if p.exists() and not p.is_file() and not p.is_dir():
        raise RewriteError(f"{option} '{report}' is not a regular file; give a file path")
    check_writable_file(report, option)


def check_writes(out, force: bool, *, protected: dict | None = None, read: dict | None = None,
                 keep_baseline=None, report=None) -> None:
    """The one check every route (rewrite, export, VLM export) runs before its work, over every path it writes.

    `protected`: folders nothing may be, contain or lie inside ({label: path}; the checkpoint).
    `read`: files and folders we read, which nothing written may be or contain; the output may lie inside
    a folder of them (`rewrite model.onnx out` beside the model). `keep_baseline` and `report`: the
    options of those names, or None.
    """
    protected = {k: v for k, v in (protected or {}).items() if v is not None}
    read = {k: v for k, v in (read or {}).items() if v is not None}
    _check_name_lengths(resolved(out), "output folder")  # first: resolving and exists() fail on a name too long
    check_no_overlap(out, protected, read)
    precheck_folder(out, force)
    written = {"the output folder": out}
    if keep_baseline:
        check_no_overlap(keep_baseline, {**protected, **written}, read, what="--keep-baseline folder")
        precheck_folder(keep_baseline, force, "--keep-baseline folder")
        written["the --keep-baseline folder"] = keep_baseline
    if report:
        check_report_path(report, {**protected, **written}, read)


# ------------------------------------------------------------------ temporary folders

_TEMP = re.compile(r"^onnx_rewriter_[a-z]+_pid(\d+)_")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a folder it left is still in use)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temp() -> None:
    """Remove the temporary folders of runs that are gone (a SIGKILL cannot clean up after itself)."""
    root = Path(tempfile.gettempdir())
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        m = _TEMP.match(name)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(root / name, ignore_errors=True)


def make_temp(kind: str) -> Path:
    """A fresh `$TMPDIR/onnx_rewriter_<kind>_pid<pid>_xxxx` folder (the pid lets a later run remove it)."""
    clean_stale_temp()
    return Path(tempfile.mkdtemp(prefix=f"onnx_rewriter_{kind}_pid{os.getpid()}_"))


@contextlib.contextmanager
def temp_folder(kind: str):
    """A temporary folder removed on any exit: an error, Ctrl-C, SIGTERM (the CLI turns it into Ctrl-C)."""
    path = make_temp(kind)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ code from a model folder


def remote_code(trust: bool) -> dict:
    """from_pretrained's arguments for code in a model folder: runs only with --trust-remote-code, and never
    an interactive prompt (transformers asks on a terminal when the argument is left out)."""
    import transformers.dynamic_module_utils as dmu

    dmu.TIME_OUT_REMOTE_CODE = 0  # an unset trust_remote_code anywhere then refuses instead of asking
    return {"trust_remote_code": bool(trust)}


def remote_code_error(exc: BaseException, where, option: str = "--trust-remote-code") -> RewriteError | None:
    """The one-line refusal for transformers' 'contains custom code' error, naming the option; else None."""
    text = str(exc)
    if "trust_remote_code" not in text and "custom code" not in text:
        return None
    return RewriteError(f"'{where}' holds its own Python code (an auto_map in its config) that loading it would "
                        f"run; pass {option} only if you trust that code")


def write_file(path, text: str) -> None:
    """Write a file option's contents (--report) whole or not at all: a temporary sibling, then a rename."""
    p = resolved(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
