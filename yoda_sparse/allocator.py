"""Keep freed memory in the process, so that a UNet's activations stop page-faulting every step.

glibc's malloc serves large blocks with a fresh ``mmap`` (from 128 KiB; the threshold adapts
upwards, but never past 32 MiB) and gives them back with ``munmap`` when freed, and it returns
the top of its heap to the system once more than the trim threshold is free there. A dense UNet
step allocates its activation maps anew every step, so every step faults their pages in again
and the kernel zeroes them. Measured on this project's 2-core CPU, SR3 16->128 at 256x256, one
dense step: 96-185 thousand page faults and 0.3-0.6 s of system CPU time by default, 0-8
thousand and under 0.04 s with the settings below (wall time: 2.73-2.83 s against 2.96-3.30 s
in one pair of runs; within this machine's noise in another). The sparse engine, which keeps
its maps in a cache, hardly paid this, so ``yoda-sparse bench`` runs both engines with the
allocator tuned: the dense baseline is the fastest dense run.

:func:`keep_freed_memory` makes malloc serve every block from its heaps (no ``mmap``) and never
shrink them: freed activation memory is reused by the next step's. The cost is that the
process's resident memory stays at its peak until it exits, which is why the command line
applies it (it owns the process) and the library never does on its own.
:func:`allocated_bytes` reads the bytes in use, which resident memory no longer shows.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory", "allocated_bytes"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_APPLIED: list[bool] = []
_MALLINFO2: list = []


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc_function(name: str):
    """A function of the C library, or None (not Linux, or a C library without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def allocated_bytes() -> int | None:
    """Bytes malloc has handed out and not had back (glibc's ``mallinfo2``: in-use heap blocks
    plus mmapped ones), or None where that is unknown. Unlike resident memory it falls when
    memory is freed even if the process keeps the pages (:func:`keep_freed_memory`)."""
    if not _MALLINFO2:
        fn = _libc_function("mallinfo2")  # None: glibc < 2.33, or not glibc
        if fn is not None:
            fn.restype = _Mallinfo2
            fn.argtypes = []
        _MALLINFO2.append(fn)
    fn = _MALLINFO2[0]
    if fn is None:
        return None
    info = fn()
    return int(info.uordblks + info.hblkhd)


def keep_freed_memory() -> bool:
    """Tune glibc malloc for repeated large allocations (see the module docstring); True when
    applied (Linux with glibc), False elsewhere. Idempotent; affects the whole process."""
    if _APPLIED:
        return _APPLIED[0]
    ok = False
    mallopt = _libc_function("mallopt")  # None: not glibc (e.g. musl has none)
    if mallopt is not None:
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        ok = bool(mallopt(_M_MMAP_MAX, 0))  # no mmap: every block from a heap, reused when freed
        ok = bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) and ok  # never shrink the heap
        ok = bool(mallopt(_M_TOP_PAD, 64 << 20)) and ok  # grow it in 64 MiB steps
    _APPLIED.append(ok)
    return ok
