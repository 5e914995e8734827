"""The host allocator setting applied when `terdit_jax` is imported: one glibc malloc arena per core.

glibc gives every thread that allocates its own malloc arena, up to eight per core, and keeps what is freed in each
arena resident for reuse by that arena. XLA compiles on a pool of threads, so a compile leaves its freed heap spread
over many arenas, and the program's buffers then come on top of it: on the 2-core AMD EPYC VM the DiT-S/2 DDIM row
of `benchmarks/vs_diffusers.py --memory` peaked 0.44 GB above its imports with glibc's default (two runs), 0.38 to
0.43 GB with one arena per core (2026-12-04, `--side ours --rows ddim` and `--memory`, 14 runs: heap fragmentation
moves it), its time the same. So at most as many arenas as this process may use cores. MALLOC_ARENA_MAX in the
environment (glibc's own setting) wins; with another C library nothing is done.
"""
from __future__ import annotations

import ctypes
import os

M_ARENA_MAX = -8  # glibc's malloc.h


def apply(environ=os.environ) -> int | None:
    """mallopt(M_ARENA_MAX, cores) → the arena limit set, or None (MALLOC_ARENA_MAX given, or not glibc)."""
    if "MALLOC_ARENA_MAX" in environ:
        return None
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if mallopt(M_ARENA_MAX, cores) == 1 else None
