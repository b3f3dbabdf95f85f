"""Progress bars for the slow parts (model load, export, rewrite steps, weight writing, verify).

Shown only when stderr is a terminal, and never with -q: logs and captured output stay clean.
Off a terminal (make, CI) the CLI asks for one line per stage instead (`set_stage_lines`), so a long
export is not silence. Everything here is a no-op object when bars are off, so callers never branch on it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

_quiet = False
_stage_lines = False


def set_stage_lines(on: bool) -> bool:
    """Print `desc: stage` lines where no bar is shown (the CLI, not -q). Returns the previous setting."""
    global _stage_lines
    previous, _stage_lines = _stage_lines, on
    return previous


def set_quiet(quiet: bool) -> None:
    """The CLI's -q: no bars from us, transformers or the hub (nor when stderr is not a terminal)."""
    global _quiet
    _quiet = quiet
    if not enabled():
        _silence_hf()


def enabled() -> bool:
    try:
        return not _quiet and sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stderr
        return False


def _silence_hf() -> None:
    # Not imported yet: the hub's switch, which transformers also reads at import (importing transformers
    # just to silence it would cost seconds). Already imported: their own switches.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    mods = sys.modules
    if "transformers" in mods:
        mods["transformers"].utils.logging.disable_progress_bar()
    if "huggingface_hub" in mods:  # its `utils` is no attribute until imported (only `constants` may be)
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()


class _Null:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s="", refresh=True):
        pass

    def refresh(self):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def bar(total=None, desc: str = "", nbytes: bool = False, leave: bool = False):
    """A tqdm bar (bytes when `nbytes`), or a no-op stand-in when bars are off."""
    if not enabled():
        return _Null()
    from tqdm import tqdm

    kw = dict(unit="B", unit_scale=True, unit_divisor=1024) if nbytes else dict(unit="step")
    return tqdm(total=total, desc=desc, leave=leave, dynamic_ncols=True, file=sys.stderr, **kw)


@contextlib.contextmanager
def stages(names: list[str], desc: str):
    """A bar over named stages whose own work reports nothing (torch export): its clock keeps ticking.

    Yields `advance(name)`: call it when entering each stage.
    """
    pb = bar(total=len(names), desc=desc)
    if isinstance(pb, _Null):
        if not (_stage_lines and not _quiet):
            yield lambda name: None
            return
        t0 = time.perf_counter()

        def line(name: str) -> None:
            print(f"{desc}: {name} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)

        yield line
        return
    stop = threading.Event()
    started = [False]

    def tick():  # tqdm redraws only on update(); refresh so elapsed time moves during long stages
        while not stop.wait(1.0):
            pb.refresh()

    def advance(name: str) -> None:
        if started[0]:
            pb.update()
        started[0] = True
        pb.set_postfix_str(name)

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    try:
        yield advance
        if started[0]:
            pb.update()
    finally:
        stop.set()
        t.join()
        pb.close()
