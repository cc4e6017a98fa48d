"""Shared fixtures: paths, the shared CIFAR subset, the XLA compilation cache, and the one
subprocess on 8 emulated devices that every eight-device check shares."""

from __future__ import annotations

import atexit
import json
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
# Cache every program, however small or quick to compile (jax's defaults skip those under 1 s).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# The suite compiles hundreds of small programs and runs each for a few steps, so compiling is
# most of its time: LLVM at -O0 and XLA:CPU's older elemental emitters (where this XLA still has
# them) compile faster (BENCHMARKS.md, *Test suite: compile flags*), and no test's assertion
# depends on how fast the compiled code runs. A test that runs the user's own command (the
# quickstart) passes USER_XLA_FLAGS instead.


def _known_to_xla(flag: str) -> bool:
    """Whether this jaxlib's XLA accepts `flag` (an unknown flag in XLA_FLAGS is fatal)."""
    probe = "import jax; jax.devices('cpu')"
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True)
    return proc.returncode == 0


if "SELFSUP_TEST_FAST_COMPILE" not in os.environ:  # the run's first process; workers inherit
    _fast = ["--xla_backend_optimization_level=0"]
    _fast += [f for f in ["--xla_cpu_use_fusion_emitters=false"] if _known_to_xla(f)]
    os.environ["SELFSUP_TEST_USER_XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    os.environ["SELFSUP_TEST_FAST_COMPILE"] = " ".join(_fast)
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_fast]).strip()
USER_XLA_FLAGS = os.environ["SELFSUP_TEST_USER_XLA_FLAGS"]
FAST_COMPILE = os.environ["SELFSUP_TEST_FAST_COMPILE"]

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


def rel_err(got, want) -> float:
    """max |got - want| relative to max |want|, in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


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


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test's subprocess on `devices` emulated CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def run_python(
    code: str, *, devices: int = 1, timeout: int = 300, argv: list[str] = (), **env
) -> str:
    """Run `code` in a fresh interpreter with `devices` emulated CPU devices; return stdout."""
    full_env = {**os.environ, **env}
    full_env["XLA_FLAGS"] = xla_flags(devices)
    full_env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv],
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


# ------------------------------------------------------------------ the eight-device checks
#
# A test module lists its scripts in `EIGHT_DEVICE_CHECKS = {name: code}`; each script prints
# its result as one JSON line last. The tests that use the `eight_devices` fixture read their
# check's result with `eight_devices(name)` and assert on it. One fresh interpreter with 8
# emulated CPU devices runs every listed check of the selected tests, one after the other (the
# interpreter and jax start once), each in its own namespace with `TMP`, an empty folder of its
# own. pytest-xdist keeps these tests on one worker (`--dist loadgroup` in pyproject) and starts
# them first, so the subprocess runs beside the rest of the suite.

EIGHT_DEVICE_GROUP = "eight_devices"

_RUNNER = r"""
import contextlib, io, json, os, sys, time, traceback
sys.path[:0] = ["tests"]  # the test modules import conftest
checks = json.load(open(sys.argv[1]))
results = {}
for name, check in checks.items():
    start = time.perf_counter()
    out = io.StringIO()
    namespace = {"__name__": "__main__", "TMP": check["tmp"]}
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(check["code"], f"<eight-device check {name}>", "exec"), namespace)
        lines = out.getvalue().strip().splitlines()
        results[name] = {"stdout": lines[-1] if lines else ""}
    except BaseException:
        results[name] = {"error": traceback.format_exc()[-4000:]}
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
    outcome = "FAILED" if "error" in results[name] else "ok"
    print(f"eight-device check {name}: {outcome} in {time.perf_counter() - start:.0f} s",
          file=sys.stderr, flush=True)
print("EIGHT-DEVICE-RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="session")
def eight_devices(request, tmp_path_factory):
    """`eight_devices(name)` -> the last stdout line of check `name`, run with the others."""
    checks = {}
    for item in request.session.items:
        if "eight_devices" in getattr(item, "fixturenames", ()):
            checks.update(getattr(item.module, "EIGHT_DEVICE_CHECKS", {}))
    root = tmp_path_factory.mktemp("eight_devices")
    spec = {}
    for name, code in checks.items():
        tmp = root / re.sub(r"\W", "_", name)
        tmp.mkdir()
        spec[name] = {"code": code, "tmp": str(tmp)}
    (root / "checks.json").write_text(json.dumps(spec))
    stdout = run_python(_RUNNER, devices=8, timeout=1800, argv=[str(root / "checks.json")])
    line = [s for s in stdout.splitlines() if s.startswith("EIGHT-DEVICE-RESULTS ")][-1]
    results = json.loads(line.split(" ", 1)[1])
    (root / "seconds.json").write_text(json.dumps({k: v["seconds"] for k, v in results.items()}))

    def result(name: str) -> str:
        assert name in results, f"no eight-device check {name!r} (listed: {sorted(results)})"
        assert "error" not in results[name], f"check {name!r} failed:\n{results[name]['error']}"
        return results[name]["stdout"]

    return result


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Mark the numerics tests (`-m numerics`, run on a GPU by benchmarks/gpu.py): every op
    test, and every test compared with a NumPy float64 reference. Put the tests that share the
    eight-device subprocess in one xdist group, first, then the `longest`."""
    for item in items:
        if item.path.parent.name == "ops" or re.search(r"numpy|float64", item.name):
            item.add_marker(pytest.mark.numerics)
    shared = [item for item in items if "eight_devices" in getattr(item, "fixturenames", ())]
    for item in shared:
        item.add_marker(pytest.mark.xdist_group(EIGHT_DEVICE_GROUP))
    longest = [item for item in items if item.get_closest_marker("longest")]
    items[:] = shared + longest + [item for item in items if item not in shared + longest]


@pytest.fixture(scope="module")
def tc():
    """torch, torchvision and timm (skips the test without the test extra), on one thread: the
    models here are tiny, and idle worker threads only spin."""
    import torch_compat

    threads = torch_compat.torch.get_num_threads()
    torch_compat.torch.set_num_threads(1)
    yield torch_compat
    torch_compat.torch.set_num_threads(threads)
