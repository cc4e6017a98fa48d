"""selfsup.train.host_memory: once `selfsup train` applied it, a large block freed by a worker
thread (as XLA:CPU frees a step's temporary buffer) is reused by the next allocation instead of
being unmapped and page-faulted in again; SELFSUP_HOST_MEMORY=default leaves glibc's behaviour,
and so does importing selfsup and its library modules. Each case runs in a fresh interpreter, as the
setting must precede the thread's first allocation."""

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


# `selfsup train` tunes its process before anything else, here before a config error ends it.
TRAIN_COMMAND = """
from selfsup import cli
assert cli.main(["train", "--config", "no_such_config.py", "--workdir", "/nonexistent"]) == 2
"""
# Every library module a notebook might import.
LIBRARY_IMPORTS = """
import selfsup, selfsup.train.loop, selfsup.export, selfsup.evaluators, selfsup.data, selfsup.ops
"""


def faults_after(prelude: str, **env) -> dict:
    return json.loads(run_python(prelude + ROUNDS, **env).splitlines()[-1])


def test_train_command_makes_a_freed_block_reused_without_page_faults():
    out = faults_after(TRAIN_COMMAND, JAX_PLATFORMS="cpu")
    assert out["faults"][0] >= out["pages"] * 0.9, out  # the first round maps and touches it
    assert max(out["faults"][1:]) < out["pages"] // 100, out


@pytest.mark.parametrize(
    "prelude, env",
    [
        (TRAIN_COMMAND, {"SELFSUP_HOST_MEMORY": "default", "JAX_PLATFORMS": "cpu"}),
        (TRAIN_COMMAND, {"JAX_PLATFORMS": "cuda"}),  # an accelerator host: left alone
        (LIBRARY_IMPORTS, {"JAX_PLATFORMS": "cpu"}),  # importing changes nothing global
    ],
    ids=["default-setting", "accelerator", "import-only"],
)
def test_glibc_keeps_unmapping_it(prelude, env):
    out = faults_after(prelude, **env)
    assert min(out["faults"]) >= out["pages"] * 0.9, out
