"""Give freed heap memory back to the system between big steps.

numpy's temporaries of a few MB come from glibc's heap once its adaptive mmap threshold has risen (it does after
the first large array is freed); freed, they stay in the process's resident set as free heap until trimmed. A
rewrite that makes thousands of them (calibration, codes made a block at a time) would otherwise end with its
peak set by that slack rather than by what it holds (NVFP4 codes at 1.5B dims: ~20 MB of it).
"""

from __future__ import annotations

import ctypes
import ctypes.util

_LIBC = None


def release() -> None:
    """malloc_trim(0) where the C library has it (glibc); nothing elsewhere."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
