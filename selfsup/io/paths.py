"""Paths that may be URLs: every file selfsup reads or writes goes through `path()`.

A workdir may be local (`/runs/mae`, `~/runs/mae`) or a bucket URL (`gs://bucket/runs/mae`).
`path()` returns an `etils.epath.Path` for both, the path type orbax and TFDS use: for `gs://`
it talks to Cloud Storage through `gcsfs` (`pip install gcsfs`), with TensorFlow through
`tf.io.gfile`. Object stores have no rename and no append, so:

- `write_bytes` / `write_text` replace a local file atomically (temporary file, then rename) and
  write a URL's object directly (an object appears whole when its upload closes);
- files that grow (metrics.jsonl, TensorBoard events) are written in a local staging folder and
  copied whole to the URL (`upload`; see `selfsup.io.logs.Writer`).
"""

from __future__ import annotations

import os
import re

from etils import epath

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(p: str | os.PathLike) -> bool:
    """True for `scheme://...` (gs://, s3://, ...), False for a local path."""
    return bool(_URL.match(os.fspath(p)))


def path(p: str | os.PathLike) -> epath.Path:
    """`p` as an epath.Path: a URL as given, a local path with `~` expanded and made absolute."""
    text = os.fspath(p)
    if is_url(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `p` so that no reader sees a partial file; creates the parent folder."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_url(target):
        target.write_bytes(data)
        return
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def write_text(p: str | os.PathLike, text: str) -> None:
    write_bytes(p, text.encode())


def upload(local: str | os.PathLike, p: str | os.PathLike) -> None:
    """Copy the local file `local` whole to `p` (a URL or a local path)."""
    with open(local, "rb") as f:
        write_bytes(p, f.read())


def has_files(p: str | os.PathLike) -> bool:
    """True if `p` holds a file anywhere below it (False when it does not exist)."""
    root = path(p)
    if not root.exists():
        return False
    return any(files for _, _, files in root.walk())


def remove_if_empty(p: str | os.PathLike) -> None:
    """Delete the folder tree `p` if no file is in it (a run that stopped before writing)."""
    root = path(p)
    if root.exists() and not has_files(root):
        root.rmtree()
