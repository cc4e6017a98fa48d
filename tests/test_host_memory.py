"""selfsup.host_memory: after `import selfsup`, a large block freed by a worker thread (as
XLA:CPU frees a step's temporary buffer) is reused by the next allocation instead of being
unmapped and page-faulted in again; SELFSUP_HOST_MEMORY=default leaves glibc's behaviour. Each
case runs in a fresh interpreter, as the setting must precede the thread's first allocation."""

from __future__ import annotations

import json
import platform

import pytest
from conftest import run_python

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# A worker thread mallocs and fills 64 MiB, frees it, and does so again: the page faults of
# each round, and the block's size in pages.
ROUNDS = """
import ctypes, json, resource, threading
import selfsup
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 64 << 20, []

def rounds():
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

worker = threading.Thread(target=rounds)
worker.start()
worker.join()
print(json.dumps({"faults": faults, "pages": size // 4096}))
"""


def test_a_freed_block_is_reused_without_page_faults():
    out = json.loads(run_python(ROUNDS).splitlines()[-1])
    assert out["faults"][0] >= out["pages"] * 0.9, out  # the first round maps and touches it
    assert max(out["faults"][1:]) < out["pages"] // 100, out


def test_default_setting_leaves_glibc_unmapping_it():
    out = json.loads(run_python(ROUNDS, SELFSUP_HOST_MEMORY="default").splitlines()[-1])
    assert min(out["faults"]) >= out["pages"] * 0.9, out
