"""Process-wide set-up of the command-line tools: glibc's allocator thresholds, and a quiet profiler.

glibc returns freed memory above its trim threshold to the OS, and serves large blocks with fresh
``mmap`` calls, so a loop that allocates and frees megabyte-sized tensors (a solver step, a DEQ
layer, the C-DEQ student's Anderson step) pays page faults on every iteration. Raising both
thresholds keeps that memory in the process. PyTorch's CPU performance guide makes the same point
and suggests jemalloc or tcmalloc; this needs no extra library.

The command-line entry points call :func:`tune_cpu_allocator`; set ``CDEQ_MALLOC_TUNING=0`` to
keep glibc's defaults. Library code never calls it by itself.

:func:`quiet_profiler` silences the two lines (``USDT: ... profiler_start`` / ``profiler_stop``)
that PyTorch's profiler (Kineto) writes on stderr for every session in torch 2.13: the pipeline
opens one per table row to measure peak memory on the CPU, so a ``cdeq run`` printed about sixty.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1   # mallopt parameter numbers (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20   # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 2**30


def tune_cpu_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if they were set (False on
    another C library or OS, or with ``CDEQ_MALLOC_TUNING=0``)."""
    if os.environ.get("CDEQ_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


KINETO_QUIET = "6"  # Kineto's log levels run 0 (verbose) to 5 (USDT); 6 prints none of them


def quiet_profiler() -> bool:
    """Silence the profiler's own log lines for this process (``KINETO_LOG_LEVEL``), unless the
    user set that level; True if set here. Kineto reads it when the first profiler session
    starts, so call this before any (the command-line tools do so at start)."""
    if "KINETO_LOG_LEVEL" in os.environ:
        return False
    os.environ["KINETO_LOG_LEVEL"] = KINETO_QUIET
    return True
