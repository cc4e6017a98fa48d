"""Quiets the reports of the reads and writes that a failed orbax restore or save leaves behind.

When one array of a checkpoint cannot be read (or written: a full disk), orbax raises at once
and abandons its work on the other arrays. Each of those is then reported with a traceback, at
a time that depends on the garbage collector: asyncio logs "Task exception was never
retrieved", a collected coroutine is an unraisable exception, and a read or write that finishes
after orbax's event loop closed says "Event loop is closed". That is pages of tracebacks around
the caller's one-line error.

`quiet()` wraps each call into orbax that reads or writes arrays, and `begin()` / `end()` span
the background writes of an asynchronous save. While any runs, and for the rest of the process
once one has failed (the reports come late), exactly those reports are dropped; everything else
reaches the previous hook and asyncio's logger as before. Nothing is installed until then.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from collections.abc import Iterator

_ASYNCIO = logging.getLogger("asyncio")
_failed = False  # a restore or save has failed: late reports may come until the process exits
_depth = 0


def _from_checkpoint_io(error: BaseException | None) -> bool:
    """Whether `error` came from orbax or tensorstore (whose errors carry their spec)."""
    if error is None:
        return False
    if "tensorstore" in str(error).lower():
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return any("orbax" in f.filename or "tensorstore" in f.filename for f in frames)


def _orbax_coroutine(obj) -> bool:
    code = getattr(obj, "cr_code", None)
    return code is not None and "orbax" in code.co_filename


class _AsyncioFilter(logging.Filter):
    """Drops asyncio's reports of abandoned orbax work (never retrieved, destroyed pending)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if _from_checkpoint_io(error):
            return False
        return "orbax" not in record.getMessage()


_FILTER = _AsyncioFilter()


def _unraisable_hook(previous):
    def hook(unraisable) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        if _orbax_coroutine(unraisable.object) or _from_checkpoint_io(value):
            return
        previous(unraisable)

    hook.previous = previous
    return hook


def _install() -> None:
    if _FILTER not in _ASYNCIO.filters:
        _ASYNCIO.addFilter(_FILTER)
    if not hasattr(sys.unraisablehook, "previous"):
        sys.unraisablehook = _unraisable_hook(sys.unraisablehook)


def _uninstall() -> None:
    _ASYNCIO.removeFilter(_FILTER)
    previous = getattr(sys.unraisablehook, "previous", None)
    if previous is not None:  # another hook set since stays
        sys.unraisablehook = previous


def begin() -> None:
    """Orbax work that may be abandoned starts (a save runs on in the background): until the
    matching `end`, its reports are dropped."""
    global _depth
    _install()
    _depth += 1


def end(failed: bool = False) -> None:
    """The work of a `begin` is over; `failed`: it raised, and its reports may come later."""
    global _depth, _failed
    _depth -= 1
    _failed = _failed or failed
    if not _depth and not _failed:
        _uninstall()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Runs an orbax restore or save call between `begin` and `end`."""
    begin()
    try:
        yield
    except BaseException:
        end(failed=True)
        raise
    end()
