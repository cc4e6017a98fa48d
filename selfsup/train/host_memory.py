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
threads share one arena's lock: a process-wide choice, so no library import makes it. `selfsup
train` applies it when JAX will run on the CPU alone, before JAX starts (a thread keeps the arena
it started with). glibc only; a no-op elsewhere, and when SELFSUP_HOST_MEMORY=default.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
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


def jax_runs_on_cpu_only() -> bool:
    """Whether JAX will find no accelerator in this process, decided without starting its
    backends: JAX_PLATFORMS names cpu alone, or no GPU/TPU plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return set(platforms.lower().split(",")) <= {"cpu"}
    if importlib.util.find_spec("libtpu") is not None:
        return False
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    try:
        import jax_plugins  # namespace package of the CUDA/ROCm plugins
    except ImportError:
        return True
    return not any(pkgutil.iter_modules(jax_plugins.__path__))
