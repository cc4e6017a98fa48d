"""Keep freed host memory in the process, so XLA:CPU's per-step buffers are not page-faulted in
again on every step.

XLA:CPU allocates a step's temporary buffer (hundreds of MiB for a ResNet-50 or ViT-B step)
with `malloc` from one of its worker threads and frees it when the step ends. glibc serves an
allocation that large from a fresh `mmap` and returns it with `munmap` on free, so every step
touches ~100k new zero pages: 103k minor page faults and ~0.15 s of kernel time per 1 s SimCLR
ResNet-50 step on one core (BENCHMARKS.md, *Host memory*). With one malloc arena for all
threads (a worker thread's own arena cannot grow past 64 MiB without `mmap`), no `mmap` for
large blocks and no trimming of the heap's top, the freed buffer stays mapped and the next
step reuses its pages: no faults in most steps (when the heap is fragmented, glibc still
extends it and part of the buffer is faulted in anew).

The cost: the process keeps its peak heap mapped (what a training process holds anyway), and
threads share one arena's lock. glibc only; a no-op elsewhere, and when SELFSUP_HOST_MEMORY=default.
It must run before XLA's threads first allocate (a thread keeps the arena it started with), so
`import selfsup` applies it; a process that ran a JAX computation before that keeps glibc's
default behaviour.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Set glibc's malloc to one arena, no mmap'd blocks and no trimming; True if it did."""
    if os.environ.get("SELFSUP_HOST_MEMORY", "") == "default":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; -1 for the trim threshold disables trimming (mallopt(3)).
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)
