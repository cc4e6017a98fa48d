"""Checkpoints: orbax under one small class, plus a device-free params reader.

A checkpoint is `<workdir>/checkpoints/<step>/` with two items: `state`, a plain nested dict of
global jax.Arrays (the TrainState after `flax.serialization.to_state_dict`), and `meta`, a JSON
dict (schema version, step, data position, resolved config). Orbax writes each step into
`<step>.orbax-checkpoint-tmp/` and renames it to `<step>/` only once every item is written, so a
crash mid-save leaves the previous checkpoints untouched and the partial directory is never
listed as a step. A Manager deletes such leftovers when it opens (before its first save at the
latest): open one Manager per workdir at a time. `restore_params` only reads.

Orbax does not verify what it reads back (a flipped byte in an array file restores as a wrong
value), so `meta["checksums"]` holds two 32-bit sums of every array's bits, and every restore
compares them: a mismatch, like any unreadable file, is a `DamagedCheckpoint`.
`Manager.restore_intact` (resuming) then falls back to the newest intact step and moves the
damaged ones to `<workdir>/checkpoints_damaged/`; `restore_tree` (eval, export) refuses with the
intact steps named.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from selfsup import pytree
from selfsup.errors import UserError
from selfsup.io import abandoned_io, checksums, paths

PyTree = Any

SCHEMA_VERSION = 1


def _directory(workdir: str | os.PathLike) -> Path:
    return paths.path(workdir) / "checkpoints"  # gs:// URLs stay URLs


def _registry(state_args: tuple[type, ...]) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    # Registering the items up front lets metadata be read before any save or restore.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args in state_args:
        registry.add("state", args)
    registry.add("meta", ocp.args.JsonSave)
    registry.add("meta", ocp.args.JsonRestore)
    return registry


def _cause(e: BaseException) -> str:
    """The innermost error of `e`'s chain (orbax wraps tensorstore's, which says what is
    wrong, in one that holds a repr of a C++ binding), first line, short enough for one line."""
    seen = set()
    while id(e) not in seen and (e.__cause__ or e.__context__) is not None:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    lines = re.sub(r"<bound method [^>]*>?", "", str(e)).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:200]}"


class DamagedCheckpoint(UserError):
    """A checkpoint whose files are missing, unreadable, or whose arrays fail their checksums."""

    def __init__(self, step_dir: Path, cause: str, intact: list[int] | None = None):
        self.step_dir, self.cause = step_dir, cause
        fix = ""
        if intact is not None:
            fix = (
                f"; intact steps: {intact}: pass --step with one of them"
                if intact
                else "; no other step is intact"
            )
        super().__init__(f"checkpoint {step_dir} is damaged or unreadable ({cause}){fix}")


def _unreadable(step_dir: Path, e: BaseException) -> DamagedCheckpoint:
    return DamagedCheckpoint(step_dir, _cause(e))


def _verify(step_dir: Path, meta: dict, sums: dict[str, str]) -> None:
    """Raises DamagedCheckpoint where `sums` (of restored arrays) differ from the recorded ones.
    Checkpoints written before checksums existed have none and pass."""
    recorded = meta.get("checksums")
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise DamagedCheckpoint(step_dir, "its checksum record is not a dict")
    for key in sorted(sums):
        if recorded.get(key) != sums[key]:
            what = "has no checksum" if key not in recorded else "does not match its checksum"
            raise DamagedCheckpoint(step_dir, f"array {key} {what}")


def _no_checkpoint(directory: Path) -> UserError:
    return UserError(
        f"no checkpoint in {directory}: train first, or pass the workdir of a run that saved one"
    )


def _resolve_step(mngr: ocp.CheckpointManager, directory: Path, step: int | None) -> int:
    steps = list(mngr.all_steps())
    if not steps:
        raise _no_checkpoint(directory)
    if step is None:
        return max(steps)
    if int(step) not in steps:
        raise UserError(
            f"no checkpoint for step {step} in {directory}: pick one of {sorted(steps)}"
        )
    return int(step)


def _read_meta(mngr: ocp.CheckpointManager, directory: Path, step: int) -> dict:
    """Restores `meta` and checks its schema version."""
    step_dir = directory / str(step)
    try:
        with abandoned_io.quiet():
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:
        raise _unreadable(step_dir, e) from e
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if not isinstance(version, int):
        raise DamagedCheckpoint(step_dir, "its metadata has no schema_version")
    if version > SCHEMA_VERSION:
        raise UserError(
            f"checkpoint {step_dir} has schema_version {version}, newer than this selfsup's "
            f"{SCHEMA_VERSION}: upgrade selfsup to read it"
        )
    return meta


def _read_tree_metadata(mngr: ocp.CheckpointManager, step: int) -> PyTree | None:
    """The stored tree of ArrayMetadata (shape, dtype), or None where it cannot be read."""
    try:
        with abandoned_io.quiet():
            return mngr.item_metadata(step)["state"].tree
    except Exception:
        # Damaged metadata alone does not stop the arrays from being read; restore decides.
        return None


def _check_matches(stored: PyTree, target: PyTree, step_dir: Path) -> None:
    """Raises a UserError naming the first key whose presence, shape or dtype differs."""
    have, want = pytree.by_path(stored), pytree.by_path(target)
    fix = "the config does not match the checkpoint; resume with the config it was saved with"
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    if missing:
        raise UserError(
            f"checkpoint {step_dir} has no {missing[0]} but the config builds one: {fix}, "
            "or a new workdir"
        )
    if extra:
        raise UserError(
            f"checkpoint {step_dir} has {extra[0]} but the config does not build it: {fix}, "
            "or a new workdir"
        )
    for key in sorted(want):
        h, w = have[key], want[key]
        h_shape, w_shape = tuple(getattr(h, "shape", ())), tuple(np.shape(w))
        if h_shape != w_shape:
            raise UserError(
                f"the checkpoint's {key} has shape {h_shape} but the config builds {w_shape} "
                f"({step_dir}): {fix}"
            )
        h_dtype, w_dtype = getattr(h, "dtype", None), getattr(w, "dtype", None)
        if h_dtype is not None and w_dtype is not None and np.dtype(h_dtype) != np.dtype(w_dtype):
            raise UserError(
                f"the checkpoint's {key} has dtype {np.dtype(h_dtype)} but the config builds "
                f"{np.dtype(w_dtype)} ({step_dir}): {fix}"
            )


def _abstract(target: PyTree) -> PyTree:
    """Target leaves -> jax.ShapeDtypeStruct with a sharding (the default device if none)."""

    def one(x):
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            if jax.process_count() > 1:
                raise UserError(
                    "a restore target leaf has no sharding in a multi-process run: build the "
                    "target with the mesh's shardings"
                )
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        dtype = getattr(x, "dtype", None)
        if dtype is None:  # a Python scalar: the dtype jax would give it
            dtype = jnp.asarray(x).dtype
        return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sharding)

    return jax.tree.map(one, target)


class Manager:
    """Saves and restores `(state, meta)` under `<workdir>/checkpoints/<step>/`.

    Every process of a multi-host run makes the same calls; orbax coordinates the writes.
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = _directory(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            # A crashed save leaves `<step>.orbax-checkpoint-tmp`; it never holds a finished
            # checkpoint, so it is deleted (orbax finishes this before the next save starts).
            cleanup_tmp_directories=True,
            create=True,
        )
        registry = _registry((ocp.args.StandardSave, ocp.args.StandardRestore))
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )
        self._writing = False  # saves may be running in the background (abandoned_io.begin)

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is none."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        """Committed steps, ascending."""
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state: PyTree, meta: dict, *, wait: bool = False) -> None:
        """Saves `state` (nested dict of global jax.Arrays) and `meta` (JSON-able dict) at `step`.

        Returns once the arrays are copied off the devices, so the caller may donate them;
        the files are written in the background unless `wait`. `meta` gains `schema_version`,
        `step` and `checksums` (see `checksums`). Steps must increase.
        """
        step = int(step)
        latest = self._mngr.latest_step()
        if latest is not None and step <= latest:
            raise UserError(
                f"cannot save step {step} in {self.directory}: it already holds step {latest}; "
                "resume from it (the training loop does) or use a new workdir"
            )
        # Host arrays become JAX arrays first (float64 -> float32 without x64), so what is saved
        # is what is summed; the loop's state is JAX arrays already.
        state = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), state)
        # Summed on the devices before `save` returns: the caller may donate `state` after.
        meta = {
            **meta,
            "schema_version": SCHEMA_VERSION,
            "step": step,
            "checksums": checksums.on_devices(state),
        }
        json.dumps(meta)  # fail here, in the caller, rather than in the writer thread
        if not self._writing:  # the writes go on after save returns; wait() sees them end
            abandoned_io.begin()
            self._writing = True
        with abandoned_io.quiet():  # a failed previous save raises here
            self._mngr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
        if wait:
            self.wait()

    def restore(self, target: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
        """Restores `(state, meta)` of `step` (the latest when None) onto `target`'s shardings.

        `target` has the state's tree structure; its leaves are jax.ShapeDtypeStruct (with the
        new mesh's `.sharding`) or concrete arrays. The mesh may differ from the one that saved.
        Leaves without a sharding go to the first local device (single-process runs only).
        Raises UserError when the checkpoint is missing, damaged, newer than this code, or
        differs from `target` in a key, shape or dtype.
        """
        self.wait()
        step = _resolve_step(self._mngr, self.directory, step)
        step_dir = self.directory / str(step)
        meta = _read_meta(self._mngr, self.directory, step)
        stored = _read_tree_metadata(self._mngr, step)
        if stored is not None:
            _check_matches(stored, target, step_dir)
        try:
            with abandoned_io.quiet():
                restored = self._mngr.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target))),
                )
        except UserError:
            raise
        except Exception as e:
            raise _unreadable(step_dir, e) from e
        _verify(step_dir, meta, checksums.on_devices(restored.state))
        return restored.state, meta

    def restore_intact(self, target: PyTree) -> tuple[PyTree, dict, list[DamagedCheckpoint]]:
        """`restore(target)` of the newest intact step, for resuming a run.

        Damaged newer steps are moved to `<workdir>/checkpoints_damaged/<step>` (kept for the
        user, out of the way of the steps the run will save again) and returned, newest first.
        Raises UserError when no step is intact, or on a mismatch with `target`.
        """
        damaged: list[DamagedCheckpoint] = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(target, step)
            except DamagedCheckpoint as e:
                damaged.append(e)
                continue
            break
        else:
            newest = damaged[0]
            raise UserError(
                f"every checkpoint in {self.directory} is damaged (step {newest.step_dir.name}: "
                f"{newest.cause}): move {self.directory} away to train anew"
            )
        if damaged:
            self._set_aside([int(e.step_dir.name) for e in damaged])
        return state, meta, damaged

    def _set_aside(self, steps: list[int]) -> None:
        aside = self.directory.parent / "checkpoints_damaged"
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            for step in steps:
                dest = aside / str(step)
                n = 1
                while dest.exists():  # never overwrite what an earlier resume set aside
                    dest, n = aside / f"{step}.{n}", n + 1
                os.replace(self.directory / str(step), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("selfsup-checkpoints-set-aside")
        self._mngr.reload()

    def wait(self) -> None:
        """Blocks until every pending save is committed."""
        with abandoned_io.quiet():
            self._mngr.wait_until_finished()
        if self._writing:
            self._writing = False
            abandoned_io.end()

    def close(self) -> None:
        """Waits for pending saves and for the deletion of crashed saves' leftovers, then
        releases orbax's resources."""
        self.wait()
        # orbax's close() does not wait for that deletion (orbax 0.12.8): a caller that removes
        # the workdir next (a run that failed before writing) raced its thread.
        with abandoned_io.quiet():
            getattr(self._mngr, "_maybe_await_cleanup_tmp_directory", lambda: None)()
            self._mngr.close()


def restore_params(workdir: str | os.PathLike, step: int | None = None) -> tuple[dict, dict]:
    """Reads `(params, meta)` of `step` (latest when None) as host NumPy, without devices.

    The tree structure, shapes and dtypes come from the checkpoint itself; only the `params`
    subtree is read. For evaluation and export.
    """
    trees, meta = restore_tree(workdir, ("params",), step)
    return trees["params"], meta


def restore_tree(
    workdir: str | os.PathLike, keys: tuple[str, ...] = ("params",), step: int | None = None
) -> tuple[dict, dict]:
    """Reads `({key: subtree}, meta)` for top-level state `keys` (e.g. "params", "model_state")
    of `step` (latest when None) as host NumPy, without devices.

    Structure, shapes and dtypes come from the checkpoint; an empty subtree (a model without
    mutable collections) comes back as {}. A key the checkpoint lacks is a UserError.
    """
    directory = _directory(workdir)
    if not directory.is_dir():
        raise _no_checkpoint(directory)
    registry = _registry((ocp.args.PyTreeRestore,))
    # No cleanup and no create: this reader must never touch a directory a run is writing.
    options = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False)
    mngr = ocp.CheckpointManager(directory, options=options, handler_registry=registry)
    try:
        step = _resolve_step(mngr, directory, step)
        try:
            return _read_subtrees(mngr, directory, step, keys)
        except DamagedCheckpoint as e:
            intact = []
            for other in sorted(mngr.all_steps()):
                if other != step:
                    with contextlib.suppress(DamagedCheckpoint):
                        _read_subtrees(mngr, directory, other, keys)
                        intact.append(other)
            raise DamagedCheckpoint(e.step_dir, e.cause, intact) from None
    finally:
        mngr.close()


def is_intact(workdir: str | os.PathLike, step: int) -> bool:
    """Whether checkpoint `step` reads back whole and matches its checksums (host NumPy, no
    devices): before a finished run says it is finished, its last checkpoint must be good."""
    try:
        restore_tree(workdir, ("params", "opt_state", "model_state"), step)
    except DamagedCheckpoint:
        return False
    return True


def _read_subtrees(
    mngr: ocp.CheckpointManager, directory: Path, step: int, keys: tuple[str, ...]
) -> tuple[dict, dict]:
    step_dir = directory / str(step)
    meta = _read_meta(mngr, directory, step)
    try:
        with abandoned_io.quiet():
            stored = mngr.item_metadata(step)["state"].tree
    except Exception as e:
        raise _unreadable(step_dir, e) from e
    if stored is None:
        raise DamagedCheckpoint(step_dir, "its array metadata is missing")
    missing = [k for k in keys if not isinstance(stored, dict) or k not in stored]
    if missing:
        raise UserError(
            f"checkpoint {step_dir} holds no {missing[0]}: pass the workdir of a training run"
        )
    # Orbax has nothing to read for an empty subtree; it is returned as {} below.
    item = {
        k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored[k])
        for k in keys
        if jax.tree.leaves(stored[k])
    }
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    args = ocp.args.PyTreeRestore(item=item, restore_args=as_numpy, partial_restore=True)
    try:
        with abandoned_io.quiet():
            restored = mngr.restore(step, args=ocp.args.Composite(state=args)).state if item else {}
    except Exception as e:
        raise _unreadable(step_dir, e) from e
    _verify(step_dir, meta, checksums.on_host(restored))
    return {k: restored.get(k, {}) for k in keys}, meta
