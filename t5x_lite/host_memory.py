"""Keep freed host memory in the process, so that XLA:CPU's per-step buffers are not page-faulted in every step.

glibc's malloc serves a large request (over 32 MB at most, often far less) with a fresh ``mmap`` and gives it back to
the kernel on ``free``. XLA:CPU allocates a program's temporary buffers on every execution, so each train step
touched hundreds of MB of new pages: on the 2-core machine 300 steps of the Multi30k recipe took 35M page faults
and 78-84 s of kernel time beside 199-277 s of user time (QUIET, docs/training.md). With ``mallopt`` told
never to ``mmap`` (one arena, no trimming of its top), freed blocks stay in the heap and the next step reuses them:
no faults. Memory that a process has once used is kept until it exits, and fragmentation raises its peak RSS
(3.7-4.4 GB against 2.9-3.2 GB for the Multi30k recipe).

It does not help every program. The evaluate and infer commands turn it on (t5_small's beam-4 search took 6.0 s with
it and 9.0-9.9 s without, QUIET, experiments/benchmarks/NOTES.md). The train command turns it on only where a config
asks (``config.keep_freed_memory``, set by configs/multi30k.py): the policy made t5_small's train step about 1.5x
slower and erratic (one arena for every thread together with no mmap; either setting alone was harmless).
``T5X_LITE_KEEP_FREED_MEMORY=1`` turns it on for any command, ``=0`` off everywhere. Elsewhere than glibc (macOS,
musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

ENV_VAR = "T5X_LITE_KEEP_FREED_MEMORY"
# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
KEEP_UP_TO = 2**31 - 1  # bytes free at the heap's top before glibc returns them (mallopt takes an int)


@functools.cache
def keep_freed_memory(wanted: bool = False) -> bool:
    """Sets glibc's malloc to keep freed memory for reuse (see the module docstring) if ``wanted`` (the run's
    config) or ``T5X_LITE_KEEP_FREED_MEMORY=1`` asks, once per process; returns whether the policy is in effect.
    Call it before the first computation, so every thread shares the one arena."""
    setting = os.environ.get(ENV_VAR, "").strip().lower()
    if setting in ("0", "false", "no", "off") or not (wanted or setting in ("1", "true", "yes", "on")):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not hasattr(libc, "gnu_get_libc_version"):  # musl has a mallopt that ignores its arguments
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_UP_TO))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
