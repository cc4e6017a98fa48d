"""Checkpoints: exact round trips, retention, async saves, resharding, errors, crash safety."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

from selfsup import checkpoint
from selfsup.errors import UserError

# A failed restore leaves orbax's other tensorstore reads in flight; when they finish (during a
# later test, too) their callbacks find orbax's event loop closed and Python reports that.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning"
)

_ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "backbone": {
            "embed": {"kernel": jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)},
            "norm": {"scale": jnp.asarray(rng.standard_normal(8), jnp.bfloat16)},
        },
        "head": {"kernel": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)},
    }


def _tx():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))


def _state(seed: int) -> dict:
    """A TrainState-like dict as the loop saves it: optax NamedTuples converted to dicts."""
    params = _params(seed)
    opt_state = _tx().init(params)
    # Non-zero moments and count, so a restore of zeros or of the wrong step would show.
    _, opt_state = _tx().update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    rng = np.random.default_rng(seed + 100)
    return {
        "step": jnp.asarray(seed, jnp.int32),
        "params": params,
        "opt_state": serialization.to_state_dict(opt_state),
        "model_state": {
            "queue": jnp.asarray(rng.integers(-1000, 1000, (5, 2)), jnp.int32),
            "mean": jnp.asarray(rng.standard_normal(2), jnp.float32),
        },
        "ema": {"decay": jnp.asarray(0.996, jnp.float32)},
        "empty": {},
    }


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _assert_identical(got, want):
    """Same tree, dtypes, shapes and bytes (bitwise, so bf16 and -0.0 count)."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype, path
        assert g.shape == w.shape, path
        assert g.tobytes() == w.tobytes(), path


_META = {"data": {"epoch": 2, "index": 37}, "config": {"lr": 1.5e-4, "depths": [2, 2], "x": None}}


def test_round_trip_exact(tmp_path):
    state = _state(7)
    want = jax.tree.map(np.asarray, state)
    mngr = checkpoint.Manager(tmp_path)
    mngr.save(7, state, _META, wait=True)
    assert mngr.latest_step() == 7 and mngr.all_steps() == [7]
    assert (tmp_path / "checkpoints" / "7").is_dir()

    got, meta = mngr.restore(_abstract(state))
    _assert_identical(got, want)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(got))
    assert meta == {**_META, "schema_version": checkpoint.SCHEMA_VERSION, "step": 7}
    assert checkpoint.SCHEMA_VERSION == 1

    # Concrete arrays (device or host) as the target give the same; the optax subtree converts back.
    got2, _ = checkpoint.Manager(tmp_path).restore(jax.tree.map(jnp.zeros_like, state))
    _assert_identical(got2, want)
    got3, _ = checkpoint.Manager(tmp_path).restore(jax.tree.map(np.zeros_like, want))
    _assert_identical(got3, want)
    template = _tx().init(_params(0))
    opt_state = serialization.from_state_dict(template, got2["opt_state"])
    assert isinstance(opt_state[1][0], optax.ScaleByAdamState)
    np.testing.assert_array_equal(opt_state[1][0].count, 1)
    mngr.close()


def test_keep_last_k(tmp_path):
    mngr = checkpoint.Manager(tmp_path, keep=2, async_save=False)
    for step in range(1, 6):
        mngr.save(step, _state(step), {"i": step})
    mngr.wait()
    assert mngr.all_steps() == [4, 5]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "5"]
    got, meta = mngr.restore(_abstract(_state(0)), step=4)
    _assert_identical(got, jax.tree.map(np.asarray, _state(4)))
    assert meta["i"] == 4 and meta["step"] == 4
    with pytest.raises(UserError, match=r"step 1 .*\[4, 5\]"):
        mngr.restore(_abstract(_state(0)), step=1)
    with pytest.raises(UserError, match="already holds step 5"):
        mngr.save(5, _state(5), {})
    with pytest.raises(UserError, match="already holds step 5"):
        mngr.save(3, _state(3), {})
    mngr.close()


def test_async_save_survives_donation(tmp_path):
    state = _state(3)
    want = jax.tree.map(lambda x: np.array(x, copy=True), state)
    mngr = checkpoint.Manager(tmp_path, async_save=True)
    mngr.save(3, state, {"a": 1})
    # The train step donates the state right after save returns: the copy must be taken.
    for x in jax.tree.leaves(state):
        x.delete()
    mngr.wait()
    assert checkpoint.Manager(tmp_path).all_steps() == [3]
    got, meta = mngr.restore(_abstract(want))
    _assert_identical(got, want)
    assert meta["a"] == 1
    mngr.close()


def test_restore_params_as_numpy(tmp_path):
    mngr = checkpoint.Manager(tmp_path, keep=5)
    mngr.save(1, _state(1), {"which": "one"})
    mngr.save(2, _state(2), {"which": "two"}, wait=True)
    params, meta = checkpoint.restore_params(tmp_path)
    assert meta["which"] == "two" and meta["schema_version"] == 1
    assert all(type(x) is np.ndarray for x in jax.tree.leaves(params))
    _assert_identical(params, jax.tree.map(np.asarray, _params(2)))
    assert params["backbone"]["norm"]["scale"].dtype == jnp.bfloat16
    params1, meta1 = checkpoint.restore_params(str(tmp_path), step=1)
    _assert_identical(params1, jax.tree.map(np.asarray, _params(1)))
    assert meta1["step"] == 1
    mngr.close()


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match=f"no checkpoint in {tmp_path / 'checkpoints'}"):
        checkpoint.restore_params(tmp_path)
    mngr = checkpoint.Manager(tmp_path)
    with pytest.raises(UserError, match="no checkpoint in"):
        mngr.restore(_abstract(_state(0)))
    with pytest.raises(UserError, match="no checkpoint in"):
        checkpoint.restore_params(tmp_path)
    mngr.close()


def test_newer_schema_version(tmp_path, monkeypatch):
    mngr = checkpoint.Manager(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "SCHEMA_VERSION", 2)
        mngr.save(1, _state(1), {}, wait=True)
    with pytest.raises(UserError, match="schema_version 2, newer than this selfsup's 1"):
        mngr.restore(_abstract(_state(1)))
    with pytest.raises(UserError, match="schema_version 2"):
        checkpoint.restore_params(tmp_path)
    mngr.close()


def test_target_mismatch_names_the_key(tmp_path):
    mngr = checkpoint.Manager(tmp_path)
    mngr.save(1, _state(1), {}, wait=True)
    target = _abstract(_state(1))

    wrong = jax.tree.map(lambda x: x, target)
    wrong["params"]["backbone"]["embed"]["kernel"] = jax.ShapeDtypeStruct((6, 8), jnp.float32)
    msg = r"params/backbone/embed/kernel has shape \(4, 8\) but the config builds \(6, 8\)"
    with pytest.raises(UserError, match=msg):
        mngr.restore(wrong)

    wrong = jax.tree.map(lambda x: x, target)
    wrong["model_state"]["mean"] = jax.ShapeDtypeStruct((2,), jnp.bfloat16)
    with pytest.raises(UserError, match="model_state/mean has dtype float32 but .* bfloat16"):
        mngr.restore(wrong)

    wrong = jax.tree.map(lambda x: x, target)
    del wrong["params"]["head"]
    with pytest.raises(UserError, match="has params/head/kernel but the config does not build"):
        mngr.restore(wrong)

    wrong = jax.tree.map(lambda x: x, target)
    wrong["params"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32)
    with pytest.raises(UserError, match="has no params/extra but the config builds one"):
        mngr.restore(wrong)
    mngr.close()


def _truncate(path: Path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _garbage(path: Path):
    path.write_bytes(b"\x00not json{")


def _array_files(step_dir: Path) -> list[Path]:
    # tensorstore's OCDBT keeps array chunks in files under `d/` directories.
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


_CORRUPTIONS = {
    "truncated_arrays": lambda d: [_truncate(p) for p in _array_files(d)],
    "deleted_arrays": lambda d: [p.unlink() for p in _array_files(d)],
    "garbage_array_metadata": lambda d: [_garbage(d / "state" / "_METADATA")],
    "garbage_meta": lambda d: [_garbage(p) for p in (d / "meta").iterdir()],
}


@pytest.mark.parametrize("corruption", sorted(_CORRUPTIONS))
def test_corrupt_checkpoint(tmp_path, corruption):
    mngr = checkpoint.Manager(tmp_path)
    mngr.save(1, _state(1), {}, wait=True)
    step_dir = tmp_path / "checkpoints" / "1"
    assert _CORRUPTIONS[corruption](step_dir), "nothing corrupted: the on-disk layout changed"
    with pytest.raises(UserError, match=f"checkpoint {step_dir} is damaged or unreadable"):
        checkpoint.Manager(tmp_path).restore(_abstract(_state(1)))
    with pytest.raises(UserError, match=f"checkpoint {step_dir} is damaged or unreadable"):
        checkpoint.restore_params(tmp_path)
    mngr.close()


# Saves step 1, then stalls the save of step 2 at a chosen point and waits to be killed.
_CRASH_SCRIPT = """
import sys, time
import jax.numpy as jnp
from selfsup import checkpoint

workdir, stall = sys.argv[1], sys.argv[2]

def state(v):
    return {"params": {"w": jnp.full((64, 64), v, jnp.float32)}, "step": jnp.asarray(v)}

mngr = checkpoint.Manager(workdir, keep=1)
mngr.save(1, state(1), {"v": 1}, wait=True)

def stall_here(*args, **kwargs):
    print("STALLED", flush=True)
    time.sleep(300)

if stall == "item_write":
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as mod
    async def _save_fn(self, x, directory):
        stall_here()
    mod.JsonCheckpointHandler._save_fn = _save_fn
else:
    from orbax.checkpoint._src.path import atomicity as mod
    async def finalize(self):
        stall_here()
    mod.AtomicRenameTemporaryPath.finalize = finalize
mngr.save(2, state(2), {"v": 2}, wait=True)
print("FINISHED", flush=True)
"""


def _crash_state(v):
    return {"params": {"w": jnp.full((64, 64), v, jnp.float32)}, "step": jnp.asarray(v)}


@pytest.mark.parametrize("stall", ["item_write", "rename"])
def test_crash_mid_save_keeps_previous(tmp_path, stall):
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH_SCRIPT, str(tmp_path), stall],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_ENV,
    )
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        first = proc.stdout.readline().strip()
        assert first == "STALLED", proc.stderr.read()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    ckpt_dir = tmp_path / "checkpoints"
    names = sorted(os.listdir(ckpt_dir))
    # The kill landed mid-save: step 2 exists only as an uncommitted temporary directory, and
    # keep=1 has not yet removed step 1.
    assert "1" in names and "2" not in names
    assert [n for n in names if n.startswith("2.")], names

    mngr = checkpoint.Manager(tmp_path, keep=1)
    assert mngr.latest_step() == 1 and mngr.all_steps() == [1]
    got, meta = mngr.restore(_abstract(_crash_state(1)))
    _assert_identical(got, jax.tree.map(np.asarray, _crash_state(1)))
    assert meta["v"] == 1

    # Saving again works; the leftover of step 2 is removed by the manager opened on start.
    mngr.save(3, _crash_state(3), {"v": 3}, wait=True)
    assert sorted(os.listdir(ckpt_dir)) == ["3"]
    assert checkpoint.Manager(tmp_path).all_steps() == [3]
    got, _ = mngr.restore(_abstract(_crash_state(3)))
    _assert_identical(got, jax.tree.map(np.asarray, _crash_state(3)))
    mngr.close()


# Saves arrays sharded on a 2x4 mesh and restores them onto other meshes, bit for bit.
_MESH_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from selfsup import checkpoint

assert jax.device_count() == 8, jax.devices()
workdir = sys.argv[1]

def mesh(shape):
    n = shape[0] * shape[1]
    return jax.make_mesh(shape, ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2,
                         devices=jax.devices()[:n])

rng = np.random.default_rng(0)
host = {
    "w": rng.standard_normal((8, 16)).astype(np.float32),
    "b": rng.standard_normal(16).astype(jnp.bfloat16),
    "e": rng.integers(-99, 99, (3, 8)).astype(np.int32),
    "s": np.asarray(7, np.int32),
}
specs = {"w": P("data", "fsdp"), "b": P("fsdp"), "e": P(None, "data"), "s": P()}
m24 = mesh((2, 4))
state = {"params": {k: jax.device_put(v, NamedSharding(m24, specs[k])) for k, v in host.items()}}
assert len(state["params"]["w"].addressable_shards) == 8
mngr = checkpoint.Manager(workdir)
mngr.save(1, state, {}, wait=True)

for shape in [(8, 1), (1, 1), (4, 2)]:
    m = mesh(shape)
    target = {"params": {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(m, specs[k]))
        for k, v in host.items()}}
    got, _ = checkpoint.Manager(workdir).restore(target)
    for k, v in host.items():
        x = got["params"][k]
        assert x.sharding == target["params"][k].sharding, (shape, k, x.sharding)
        assert x.dtype == v.dtype and x.shape == v.shape, (shape, k)
        assert np.asarray(x).tobytes() == v.tobytes(), (shape, k)

params, _ = checkpoint.restore_params(workdir)
for k, v in host.items():
    assert type(params[k]) is np.ndarray and params[k].tobytes() == v.tobytes(), k
print("OK")
"""


def test_restore_onto_other_meshes(tmp_path):
    env = {**_ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]
