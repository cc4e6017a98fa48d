"""The workdir's preconditions, checked before anything compiles; disk faults as one line.

`prepare(workdir)` makes sure the directory exists and can be written (not a file, not under a
file, not read-only), `check_shared(workdir)` that all processes of a multi-process run see the
same directory, and `disk_error(e)` recognises a full disk or quota in an exception.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import tempfile
from pathlib import Path

import numpy as np

from selfsup.errors import UserError
from selfsup.io import paths

_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_TEXTS = ("No space left on device", "Disk quota exceeded")


def prepare(workdir: str | os.PathLike, *, create: bool = True) -> Path:
    """Creates `workdir` (if `create`) and checks that files can be written in it.

    Raises UserError when it is a file, lies under a file, is missing (create=False), or is
    not writable (permissions, a read-only file system). A URL (gs://...) is left to the
    store: it has no folders to create, and its permissions show at the first write.
    """
    if paths.is_url(workdir):
        return paths.path(workdir)
    path = Path(workdir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"workdir {path} is a file, not a directory: pass a directory path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(
                    f"workdir {path} lies under {parent}, which is a file: pass a directory path"
                )
            break
    if not path.exists():
        if not create:
            raise UserError(f"workdir {path} does not exist: pass the workdir of a training run")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"cannot create workdir {path} ({e.strerror or e}): pass a path you can write to"
            ) from None
    try:  # the only reliable test: access() ignores read-only mounts, and root passes it anyway
        fd, probe = tempfile.mkstemp(prefix=".selfsup-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(
            f"workdir {path} is not writable ({e.strerror or e}): pass a directory you can write "
            "to, or make this one writable"
        ) from None
    return path


def check_shared(workdir: str | os.PathLike) -> None:
    """In a multi-process run, UserError unless every process sees the marker that process 0
    writes in `workdir` (else each host would write its own partial checkpoints). Every process
    must call it at the same point; a single process returns at once."""
    import jax

    if jax.process_count() == 1 or paths.is_url(workdir):  # a bucket is one place for all
        return
    from jax.experimental import multihost_utils

    nonce = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
    path = Path(workdir).expanduser().absolute()
    marker = path / f".selfsup-shared-{nonce}"
    if jax.process_index() == 0:
        marker.write_text("written by process 0 to check that every process sees this workdir\n")
    multihost_utils.sync_global_devices("selfsup-workdir-marker")
    blind = np.asarray(multihost_utils.process_allgather(np.int32(not marker.exists())))
    if jax.process_index() == 0:  # every process has looked: the gather waited for them
        marker.unlink(missing_ok=True)
    if blind.any():
        which = [int(i) for i in np.flatnonzero(blind)]
        raise UserError(
            f"workdir {path} is not shared: process(es) {which} do not see the file process 0 "
            "wrote there; give every process the same directory (NFS, Filestore, a gcsfuse mount)"
        )


def disk_error(e: BaseException) -> str | None:
    """ "No space left on device" (or a full quota) if that caused `e` (through its causes and
    the text that orbax and tensorstore wrap it in), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            return os.strerror(e.errno)
        text = str(e)
        for cause in _DISK_TEXTS:
            if cause in text:
                return cause
        e = e.__cause__ or e.__context__
    return None


class QuietDiskErrors(logging.Filter):
    """While active, drops orbax's log records (through absl) about a full disk, each with its
    traceback: the caller reports that in one line. Left by a full disk, it stays installed and
    drops all of them, as orbax's background threads fail again while the process exits."""

    def __init__(self):
        super().__init__()
        self.silenced = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.silenced:
            return False
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and disk_error(error):
            return False
        return not any(text in record.getMessage() for text in _DISK_TEXTS)

    def __enter__(self):
        logging.getLogger("absl").addFilter(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and disk_error(exc):
            self.silenced = True
        else:
            logging.getLogger("absl").removeFilter(self)
