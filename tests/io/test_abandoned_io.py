"""A failed restore or save: its stray reports are dropped, and nothing else is."""

import asyncio
import gc
import logging
import sys
import types

import pytest

from selfsup.io import abandoned_io

_TENSORSTORE_ERROR = (
    'OUT_OF_RANGE: Error reading "x/.zarray" [tensorstore_spec=\'{"driver":"zarr"}\']'
)


@pytest.fixture
def fresh(monkeypatch):
    """The module as a new process has it, and its hooks removed afterwards."""
    monkeypatch.setattr(abandoned_io, "_failed", False)
    monkeypatch.setattr(abandoned_io, "_depth", 0)
    yield
    abandoned_io._uninstall()


def _unretrieved_task_error(error: BaseException) -> None:
    """A task that fails with `error` and is collected unretrieved: asyncio then logs
    "Task exception was never retrieved" with the traceback."""

    async def read():
        raise error

    loop = asyncio.new_event_loop()
    task = loop.create_task(read())
    loop.run_until_complete(asyncio.sleep(0))  # the task runs and fails
    loop.close()
    del task
    gc.collect()


def _fail_a_restore() -> None:
    with pytest.raises(ValueError), abandoned_io.quiet():
        raise ValueError(_TENSORSTORE_ERROR)


def test_asyncio_reports_of_checkpoint_reads_are_dropped_after_a_failed_restore(fresh, caplog):
    _fail_a_restore()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _unretrieved_task_error(ValueError(_TENSORSTORE_ERROR))
        assert not caplog.records
        _unretrieved_task_error(ValueError("a bug elsewhere"))
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("Task exception was never retrieved")
    assert "a bug elsewhere" in caplog.text


def test_nothing_is_dropped_without_a_failed_restore(fresh, caplog):
    with abandoned_io.quiet():
        pass
    assert abandoned_io._FILTER not in logging.getLogger("asyncio").filters
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _unretrieved_task_error(ValueError(_TENSORSTORE_ERROR))
    assert "Task exception was never retrieved" in caplog.text


def _orbax_coroutine():
    """A coroutine whose code lives in an orbax file, as orbax's reads do."""
    scope = {}
    exec(compile("async def read():\n    pass\n", "/site-packages/orbax/read.py", "exec"), scope)
    coroutine = scope["read"]()
    coroutine.close()
    return coroutine


def test_unraisable_reports_of_orbax_reads_are_dropped_others_pass(fresh, monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    _fail_a_restore()

    def report(value, obj=None):
        sys.unraisablehook(types.SimpleNamespace(exc_value=value, object=obj))

    report(RuntimeError("Event loop is closed"))
    report(GeneratorExit(), _orbax_coroutine())
    report(ValueError("Encountered error while reading array index"), _orbax_coroutine())
    report(ValueError(_TENSORSTORE_ERROR))
    assert seen == []
    mine = ValueError("a bug elsewhere")
    report(mine, object())
    assert [u.exc_value for u in seen] == [mine]


def test_a_clean_restore_leaves_the_hooks_as_they_were(fresh, monkeypatch):
    def previous(unraisable):
        pass

    monkeypatch.setattr(sys, "unraisablehook", previous)
    with abandoned_io.quiet(), abandoned_io.quiet():
        assert sys.unraisablehook is not previous
    assert sys.unraisablehook is previous


def test_a_save_keeps_them_dropped_until_its_background_writes_are_committed(fresh, tmp_path):
    """An asynchronous save's writes fail after `save` has returned (a full disk): their
    reports must be dropped then too, and nothing once the save is committed."""
    import jax.numpy as jnp

    from selfsup.io import checkpoint

    asyncio_filters = logging.getLogger("asyncio").filters
    mngr = checkpoint.Manager(tmp_path)
    mngr.save(1, {"w": jnp.ones(3)}, {})
    assert abandoned_io._FILTER in asyncio_filters
    mngr.save(2, {"w": jnp.ones(3)}, {})
    mngr.wait()
    assert abandoned_io._FILTER not in asyncio_filters
    mngr.close()
    assert abandoned_io._FILTER not in asyncio_filters and abandoned_io._depth == 0
