"""Shared fixtures: paths, the shared CIFAR subset, and a tiny MAE config for loop tests."""

from __future__ import annotations

import atexit
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
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


def numpy_gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, x * Phi(x), float64."""
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def numpy_layer_norm(x: np.ndarray, scale, bias, eps: float) -> np.ndarray:
    """LayerNorm over the last axis with two-pass statistics, float64."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def numpy_attention(qkv: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """softmax(q k^T / sqrt(H)) v per head, float64: qkv [B, T, 3, N, H] -> [B, T, N, H];
    allowed: bool broadcastable to [B, N, T, T], True = may attend."""
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, N, T, H]
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(qkv.shape[-1])
    if allowed is not None:
        logits = np.where(allowed, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ v).transpose(0, 2, 1, 3)


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """d f / d x by float64 central differences, for a scalar NumPy function f of array x."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = eps
        grad[i] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad


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


@pytest.fixture(params=["cpu", "reference"])
def ops_form(request):
    """Run the test with every op in its CPU form, then in its reference form (what GPUs and
    TPUs run), each traced alone."""
    from selfsup import ops

    with ops.forms(request.param):
        yield request.param


def pytest_collection_modifyitems(config, items):
    """Mark the numerics tests (`-m numerics`, run on a GPU by benchmarks/gpu.py): every op
    test, and every test compared with a NumPy float64 reference."""
    for item in items:
        if item.path.parent.name == "ops" or re.search(r"numpy|float64", item.name):
            item.add_marker(pytest.mark.numerics)
