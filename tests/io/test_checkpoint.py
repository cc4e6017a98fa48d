"""Checkpoints: exact round trips, retention, async saves, resharding, errors, crash safety."""

import json
import os
import shutil
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
from conftest import REPO
from flax import serialization

from selfsup.errors import UserError
from selfsup.io import checkpoint, checksums

# A failed restore leaves orbax's other tensorstore reads in flight; when they finish (during a
# later test, too) their callbacks find orbax's event loop closed and Python reports that.
# Abandoned reads of the other arrays are closed when collected (GeneratorExit). Once a restore
# has failed, io/abandoned_io.py drops those reports; pytest installs its own hook per test.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning"
    ),
    pytest.mark.filterwarnings(
        "ignore:(?s).*(GeneratorExit|coroutine ignored):pytest.PytestUnraisableExceptionWarning"
    ),
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]

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
    sums = checksums.on_host(want)  # one per array, on the host as on the devices
    assert len(sums) == len(jax.tree.leaves(want))
    assert meta == {
        **_META,
        "schema_version": checkpoint.SCHEMA_VERSION,
        "step": 7,
        "checksums": sums,
    }
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
from selfsup.io import checkpoint

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
from selfsup.io import checkpoint

assert jax.device_count() == 8, jax.devices()
workdir = TMP

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


EIGHT_DEVICE_CHECKS = {"checkpoint_meshes": _MESH_SCRIPT}


def test_restore_onto_other_meshes(eight_devices):
    assert eight_devices("checkpoint_meshes") == "OK"


# ----------------------------------------------------------------------------- integrity


def test_checksums_on_devices_equal_numpy_and_see_one_flipped_bit():
    tree = {
        "f32": jnp.asarray(np.random.default_rng(0).standard_normal((5, 7)), jnp.float32),
        "bf16": jnp.asarray(np.random.default_rng(1).standard_normal(9), jnp.bfloat16),
        "i32": jnp.arange(-6, 6, dtype=jnp.int32).reshape(3, 4),
        "u8": jnp.arange(200, dtype=jnp.uint8),
        "bool": jnp.asarray([True, False, True]),
        "scalar": jnp.asarray(3, jnp.int32),
    }
    on_devices = checksums.on_devices(tree)
    assert on_devices == checksums.on_host(jax.tree.map(np.asarray, tree))
    assert len(set(on_devices.values())) == len(tree)
    for key, value in jax.tree.map(np.asarray, tree).items():
        flipped = value.copy().reshape(-1)
        flipped.view(np.uint8)[flipped.nbytes // 2] ^= 1
        swapped = value.reshape(-1)[::-1].copy()  # same words, other order
        assert checksums.on_host({key: flipped})[key] != on_devices[key], key
        if value.size > 1 and not np.array_equal(swapped, value.reshape(-1)):
            assert checksums.on_host({key: swapped})[key] != on_devices[key], key


def _big_state(v: int) -> dict:
    # Large enough that tensorstore stores the raw values (small chunks may be inlined).
    rng = np.random.default_rng(v)
    return {
        "step": jnp.asarray(v, jnp.int32),
        "params": {"w": jnp.asarray(rng.standard_normal((128, 128)), jnp.float32)},
        "opt_state": {"mu": jnp.asarray(rng.standard_normal((128, 64)), jnp.float32)},
        "model_state": {},
    }


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


_DAMAGES = {
    "flip": _flip_middle,
    "truncate": _truncate,
    "delete": lambda p: p.unlink(),
}


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("two_steps")
    mngr = checkpoint.Manager(workdir)
    mngr.save(2, _big_state(2), {}, wait=True)
    mngr.save(4, _big_state(4), {}, wait=True)
    mngr.close()
    return workdir


def test_every_file_of_a_checkpoint_damaged_in_turn_is_never_restored_as_good(two_steps, tmp_path):
    """Each file of step 4 flipped, truncated or deleted in turn: every restore (the loop's, the
    host reader's, the resume fallback) gives step 4's exact values or says it is damaged; never
    other values. The raw array files must be caught."""
    files = sorted(p.relative_to(two_steps) for p in (two_steps / "checkpoints" / "4").rglob("*"))
    files = [f for f in files if (two_steps / f).is_file()]
    assert len(files) >= 8, files
    want = {4: jax.tree.map(np.asarray, _big_state(4)), 2: jax.tree.map(np.asarray, _big_state(2))}
    caught = set()
    for n, (relative, (how, damage)) in enumerate(
        (f, d) for f in files for d in sorted(_DAMAGES.items())
    ):
        workdir = tmp_path / str(n)
        shutil.copytree(two_steps, workdir)
        damage(workdir / relative)
        target = _abstract(_big_state(4))
        try:
            got, _ = checkpoint.Manager(workdir).restore(target, step=4)
            _assert_identical(got, want[4])
        except checkpoint.DamagedCheckpoint as e:
            assert "checkpoints/4 is damaged" in str(e), e
            caught.add((str(relative), how))
        try:
            trees, _ = checkpoint.restore_tree(workdir, ("params", "opt_state"), step=4)
            _assert_identical(trees["params"], want[4]["params"])
            _assert_identical(trees["opt_state"], want[4]["opt_state"])
        except checkpoint.DamagedCheckpoint as e:
            assert "intact steps: [2]" in str(e), e
        mngr = checkpoint.Manager(workdir)
        got, meta, damaged = mngr.restore_intact(target)
        _assert_identical(got, want[meta["step"]])
        assert (meta["step"] == 2) == bool(damaged), (relative, how)
        mngr.close()
    data_files = {str(f) for f in files if f.parent.name == "d"}
    largest = max(data_files, key=lambda f: (two_steps / f).stat().st_size)
    assert {(largest, how) for how in _DAMAGES} <= caught, sorted(caught)


def test_resume_falls_back_to_the_newest_intact_step_and_sets_damaged_ones_aside(
    two_steps, tmp_path
):
    shutil.copytree(two_steps, tmp_path, dirs_exist_ok=True)
    step_dir = tmp_path / "checkpoints" / "4"
    largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    damaged_bytes = (_flip_middle(largest), largest.read_bytes())[1]
    mngr = checkpoint.Manager(tmp_path)
    got, meta, damaged = mngr.restore_intact(_abstract(_big_state(4)))
    _assert_identical(got, jax.tree.map(np.asarray, _big_state(2)))
    assert meta["step"] == 2 and [e.step_dir for e in damaged] == [step_dir]
    assert "does not match its checksum" in damaged[0].cause
    # Kept for the user, byte for byte, out of the way of the step the run saves again.
    moved = tmp_path / "checkpoints_damaged" / "4" / largest.relative_to(step_dir)
    assert moved.read_bytes() == damaged_bytes
    assert mngr.all_steps() == [2]
    mngr.save(4, _big_state(4), {}, wait=True)
    assert mngr.all_steps() == [2, 4]
    mngr.close()
    # With every step damaged there is nothing to resume from: one error, nothing moved.
    for step in ("2", "4"):
        d = tmp_path / "checkpoints" / step
        _flip_middle(max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size))
    with pytest.raises(UserError, match="every checkpoint in .* is damaged"):
        checkpoint.Manager(tmp_path).restore_intact(_abstract(_big_state(4)))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


@pytest.mark.slow
def test_cli_resume_from_a_damaged_latest_checkpoint(tmp_path):
    """`selfsup train` on a workdir whose latest checkpoint has flipped bytes: one line names it
    and the step resumed from; the run ends as an uninterrupted one, with one metrics record
    per step; the damaged directory is kept under checkpoints_damaged/."""
    env = {**_ENV, "PYTHONPATH": str(REPO)}

    def train(workdir, *more):
        return subprocess.run(
            [sys.executable, "-m", "selfsup.cli", "train", "--config",
             "configs/quickstart.py:smoke", "--workdir", str(workdir), *more],
            capture_output=True, text=True, env=env, timeout=600,
            cwd=REPO,
        )  # fmt: skip

    first = train(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    want = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step_dir = tmp_path / "checkpoints" / "4"
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    _flip_middle(max(files, key=lambda p: p.stat().st_size))
    resumed = train(tmp_path)  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = [line for line in resumed.stderr.splitlines() if "are damaged" in line]
    assert len(said) == 1 and f"[4] in {tmp_path / 'checkpoints'} are damaged" in said[0], said
    assert said[0].endswith("resuming from step 2"), said
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    assert os.listdir(tmp_path / "checkpoints_damaged") == ["4"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == [r["loss"] for r in want]
    # The step saved again is intact.
    trees, _ = checkpoint.restore_tree(tmp_path, ("params", "opt_state"))


def test_close_returns_after_crashed_saves_leftovers_are_deleted(tmp_path):
    """A run that fails before writing closes its manager and then removes the workdir it made:
    orbax's thread that deletes leftovers must have finished by then (it raced the removal)."""
    ckpt_dir = tmp_path / "checkpoints"
    for step in range(200):  # enough files that the deletion takes a while
        leftover = ckpt_dir / f"{step}.orbax-checkpoint-tmp-{step}" / "state"
        leftover.mkdir(parents=True)
        for i in range(5):
            (leftover / f"chunk{i}").write_bytes(b"x" * 64)
    checkpoint.Manager(tmp_path).close()
    assert os.listdir(ckpt_dir) == []
