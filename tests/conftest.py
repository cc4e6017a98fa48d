"""Shared fixtures: paths, the shared CIFAR subset, and a tiny MAE config for loop tests."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# One XLA compilation cache for the whole run, subprocesses and pytest-xdist workers included (they
# inherit this environment): many tests compile the same train step (a run, then its resumption),
# and compiling dominates their time on a CPU. Set before any test module imports jax.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="selfsup-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """`pytest -n auto`: one worker per core, at most 4. Most test time is XLA compiling, one
    thread each; more workers than that run out of memory beside the 8-device subprocesses."""
    return max(1, min(os.cpu_count() or 1, 4))


@pytest.fixture
def cifar_npz() -> Path:
    path = SHARED_DATA / "cifar10_subset.npz"
    if not path.exists():
        pytest.skip(f"real-image test needs {path} (the shared data folder beside the checkout)")
    return path


def run_python(code: str, *, devices: int = 1, timeout: int = 300, **env) -> str:
    """Run `code` in a fresh interpreter with `devices` emulated CPU devices; return stdout."""
    full_env = {**os.environ, **env}
    full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    full_env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout
