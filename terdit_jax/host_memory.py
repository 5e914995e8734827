"""The host allocator settings applied when `terdit_jax` is imported: one glibc malloc arena per core, and the
freed heap handed back to the kernel after each long XLA compile.

glibc gives every thread that allocates its own malloc arena, up to eight per core, and keeps what is freed in each
arena resident for reuse by that arena. XLA compiles on a pool of threads, so a compile leaves its freed heap spread
over many arenas, and the program's buffers then come on top of it: on the 2-core AMD EPYC VM the DiT-S/2 DDIM row
of `benchmarks/vs_diffusers.py --memory` peaked 0.44 GB above its imports with glibc's default (two runs), 0.38 to
0.43 GB with one arena per core (2026-12-04, `--side ours --rows ddim` and `--memory`, 14 runs: heap fragmentation
moves it), its time the same. So at most as many arenas as this process may use cores. MALLOC_ARENA_MAX in the
environment (glibc's own setting) wins; with another C library nothing is done.

Fewer arenas still keep the compile's freed heap resident under the program's buffers, so after every XLA compile
that took at least TRIM_AFTER_COMPILE_S the heap's free pages are handed back (glibc's `malloc_trim`, through a
`jax.monitoring` listener on JAX's backend-compile event, which fires when the compile is done and before the
program first runs). On the EPYC the DiT-S/2 DDIM row's step compile left ~0.1 GB resident that the trim (8 ms)
returned (a resident-set trace of `--side ours --rows ddim`), and the row's peak fell to 0.30-0.34 GB (six runs,
2026-12-04; diffusers' 0.375-0.38). jax 0.11's compiles leave less behind (a 100-block chain: 15 MB against
jax 0.10's 150 MB). Short compiles (eager ops) leave little and are skipped: the trim walks the whole heap.
"""
from __future__ import annotations

import ctypes
import os

M_ARENA_MAX = -8  # glibc's malloc.h
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch (jax 0.10 and 0.11)
TRIM_AFTER_COMPILE_S = 0.1


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


LIBC = _libc()


def trim_after_compile(event: str, duration_secs: float, **_) -> None:
    """jax.monitoring duration listener: malloc_trim(0) after a backend compile of ≥ TRIM_AFTER_COMPILE_S."""
    if event == BACKEND_COMPILE_EVENT and duration_secs >= TRIM_AFTER_COMPILE_S:
        LIBC.malloc_trim(0)


def apply(environ=os.environ) -> int | None:
    """Register `trim_after_compile` (glibc only) and mallopt(M_ARENA_MAX, cores) → the arena limit set, or None
    (MALLOC_ARENA_MAX given, or not glibc)."""
    if LIBC is None or not hasattr(LIBC, "malloc_trim"):
        return None
    import jax.monitoring  # importing jax does not start a backend: terdit_jax's XLA flags still apply
    jax.monitoring.register_event_duration_secs_listener(trim_after_compile)
    if "MALLOC_ARENA_MAX" in environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if LIBC.mallopt(M_ARENA_MAX, cores) == 1 else None
