"""Quiets the reports of the reads that a failed orbax restore leaves behind.

When one array of a checkpoint cannot be read, orbax raises at once and abandons its reads of
the other arrays. Each of those is then reported with a traceback, at a time that depends on
the garbage collector: asyncio logs "Task exception was never retrieved", a collected coroutine
is an unraisable exception, and a read that finishes after orbax's event loop closed says
"Event loop is closed". That is pages of tracebacks around the caller's one-line error.

`quiet()` wraps a restore. While it runs, and for the rest of the process once a restore has
failed (the reports come late), exactly those reports are dropped; everything else reaches the
previous hook and asyncio's logger as before. Nothing is installed until a restore starts.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from collections.abc import Iterator

_ASYNCIO = logging.getLogger("asyncio")
_failed = False  # a restore has failed: late reports may come until the process exits
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
    """Drops asyncio's reports of abandoned orbax reads (never retrieved, destroyed pending)."""

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


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Runs a restore with its abandoned reads' reports dropped (see the module docstring)."""
    global _depth, _failed
    _install()
    _depth += 1
    try:
        yield
    except BaseException:
        _failed = True
        raise
    finally:
        _depth -= 1
        if not _depth and not _failed:
            _uninstall()
