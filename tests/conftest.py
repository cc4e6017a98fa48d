"""Shared fixtures: paths, the shared CIFAR subset, and a tiny MAE config for loop tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


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
